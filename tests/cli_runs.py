"""Running a script's ``main`` in-process the way its command line ends: the exit status, errors as one line."""

from collections.abc import Callable

from library.cli import run_cli


def exit_status(main: Callable[[list[str]], None], *args) -> int:
    """``main``'s exit status for ``args`` (stringified), as ``python script.py ARGS`` would end."""
    try:
        run_cli(lambda: main([str(a) for a in args]))
    except SystemExit as exit_:
        return exit_.code
    return 0
