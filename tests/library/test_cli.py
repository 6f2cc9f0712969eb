"""run_cli: user errors (the suite's and networks/') end as one line and exit status 2; bugs keep their traceback.
collector_paused_for_imports: the trainers import their libraries with the cyclic collector paused."""

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from library import cli
from library.cli import collector_paused_for_imports, run_cli
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


@pytest.fixture
def recorded_freezes(monkeypatch) -> list[bool]:
    """gc.freeze calls, recorded instead of made (it would pin the test process' objects), as in a fresh process."""
    freezes: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(True))
    monkeypatch.setattr(cli, "_imports_frozen", False)
    return freezes


def test_the_collector_pauses_then_resumes_and_the_imports_are_frozen_once(recorded_freezes):
    assert gc.isenabled()
    with collector_paused_for_imports():
        assert not gc.isenabled()
    assert gc.isenabled() and recorded_freezes == [True]
    with collector_paused_for_imports():  # later imports in the same process: paused, not frozen again
        assert not gc.isenabled()
    assert gc.isenabled() and recorded_freezes == [True]


def test_the_collector_state_comes_back_after_an_error_and_stays_off_if_it_was(recorded_freezes):
    with pytest.raises(ImportError), collector_paused_for_imports():
        raise ImportError("no module named 'diffusers'")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused_for_imports():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


# Records whether the collector ran while diffusers was first imported, then stops the run there.
_IMPORT_PROBE = """import gc, sys
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers":
            print("collector enabled while importing diffusers:", gc.isenabled())
            raise KeyboardInterrupt
sys.meta_path.insert(0, Probe())
try:
    import {script}
    {script}.main(sys.argv[1:])
except KeyboardInterrupt:
    print("collector enabled afterwards:", gc.isenabled())
"""


def _argv(script: str, tmp_path: Path) -> list[str]:
    """Arguments that parse; no file is read (the run stops at the first diffusers import)."""
    if script == "networks.extract_lora_from_models":
        return ["--model_org", "a.safetensors", "--model_tuned", "b.safetensors", "--save_to", "lora.safetensors"]
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "script", ["train_network", "sdxl_train_network", "distill_unet", "networks.extract_lora_from_models"]
)
def test_the_scripts_import_their_libraries_with_the_collector_paused(script, tmp_path):
    command = [sys.executable, "-c", _IMPORT_PROBE.format(script=script), *_argv(script, tmp_path)]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert done.stdout.splitlines() == [
        "collector enabled while importing diffusers: False",
        "collector enabled afterwards: True",
    ], done.stderr[-2000:]
