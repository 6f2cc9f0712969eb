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


def assert_one_line_refusal(main: Callable[[list[str]], None], argv: list[str], capsys) -> None:
    """``argv`` ends the command line with exit status 2 and exactly one ``error: --...`` line."""
    capsys.readouterr()
    assert exit_status(main, *argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), lines
