"""bench/bench_train_step.py's wiring: kohya's child alone gets the torchvision stand-in (no training run here)."""

import os
import sys
from pathlib import Path

from bench import bench_train_step
from bench.bench_train_step import REPO, child_env


def test_child_env_puts_the_extra_path_first_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already")
    env = child_env(os.pathsep.join(["/a", "/b"]))
    assert env["PYTHONPATH"].split(os.pathsep) == ["/a", "/b", "/already"]
    assert env["HOME"] == os.environ["HOME"]
    assert child_env("")["PYTHONPATH"] == "/already"
    monkeypatch.delenv("PYTHONPATH")
    assert child_env("/a")["PYTHONPATH"] == "/a" and "PYTHONPATH" not in child_env("")


def test_only_kohyas_child_gets_the_stand_in(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_measure(tools, cwd, few, many, rounds, env=None):
        seen.update(tools=tools, cwd=cwd, env=env)
        return {name: {"step": 1.0, "startup": 2.0, "rss": 3.0} for name in tools}

    def fake_inputs(work, size, images):
        return work / "model.safetensors", work / "tokenizers", work / "img"

    monkeypatch.setattr(bench_train_step, "measure", fake_measure)
    monkeypatch.setattr(bench_train_step, "make_inputs", fake_inputs)
    kohya = tmp_path / "sd-scripts"
    argv = ["bench_train_step", "--work_dir", str(tmp_path), "--kohya_dir", str(kohya), "--kohya_python", "/k/python"]
    monkeypatch.setattr(sys, "argv", [*argv, "--cache_text_encoder_outputs"])
    bench_train_step.main()
    assert set(seen["tools"]) == {"ours", "ours, cached TE", "kohya"}
    assert set(seen["env"]) == {"kohya"}  # ours run in this very environment
    stand_in = str(REPO / "bench" / "kohya_torchvision")
    assert seen["env"]["kohya"]["PYTHONPATH"].split(os.pathsep)[0] == stand_in
    command = seen["tools"]["kohya"](3)
    assert command[:2] == ["/k/python", str(kohya / "train_network.py")] and seen["cwd"]["kohya"] == kohya
    assert command[command.index("--max_train_steps") + 1] == "3"
    assert seen["tools"]["ours"](3)[:2] == [sys.executable, str(REPO / "train_network.py")]
    assert "kohya" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", [*argv, "--extra_path", ""])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    bench_train_step.main()
    assert "PYTHONPATH" not in seen["env"]["kohya"]
    assert Path(stand_in).is_dir()
