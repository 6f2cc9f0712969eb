"""run_cli: user errors (the suite's and networks/') end as one line and exit status 2; bugs keep their traceback."""

import pytest

from library.cli import run_cli
from library.errors import ConfigError
from networks.lora_file import LoRAFileError
from networks.network_args import NetworkArgsError


@pytest.mark.parametrize("error", [ConfigError, NetworkArgsError, LoRAFileError])
def test_user_errors_print_one_line_and_exit_2(capsys, error):
    def main():
        raise error("network_args blocks: IN03 has no transformer feed-forward")

    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: network_args blocks: IN03 has no transformer feed-forward\n"


def test_other_errors_propagate():
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main)
