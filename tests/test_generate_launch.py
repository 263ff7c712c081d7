"""`rlhf generate`'s launch options (fast): `--set launch.KEY=VALUE` typed and checked as a
recipe's launch keys, `--num-processes` as their shorthand, and the launcher command they build
(captured, not run)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cli_helpers import error_line

from rlhf_cli import launcher

ARGS = ["generate", "--model", "model", "--data", "builtin:sort:train:4", "--out", "out.jsonl"]


def sets(*settings: str) -> list[str]:
    return [arg for setting in settings for arg in ("--set", setting)]


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """The argv handed to launcher.run; the fake launch fails as a worker's user error would."""
    calls = []

    def fake_run(argv):
        calls.append(argv)
        return 2

    monkeypatch.setattr(launcher, "run", fake_run)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after `launch.cpu` set it
    (tmp_path / "model").mkdir()  # the ranks load the model; the command only checks it is there
    return calls


def test_two_machines_build_the_torchrun_command(in_process, launched, tmp_path):
    args = [*ARGS, *sets("launch.num_machines=2", "launch.machine_rank=1", "launch.main_process_ip=10.0.0.7",
                         "launch.main_process_port=29611"), "--num-processes", "2"]
    assert in_process(*args) == 2
    [argv] = launched
    parts = str(Path("out.jsonl.parts") / "settings.json")
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2",
                    "--node_rank=1", "--master_addr=10.0.0.7", "--master_port=29611",
                    "-m", "rlhf_cli.cli_generate", parts]
    assert not (tmp_path / "out.jsonl.parts").exists()  # a fresh run that failed leaves nothing


def test_the_accelerate_launcher_on_the_cpu(in_process, launched):
    args = [*ARGS, *sets("launch.launcher=accelerate", "launch.num_processes=2", "launch.cpu=true")]
    assert in_process(*args) == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # the ranks inherit it: no GPU
    [argv] = launched
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" in argv
    assert argv[argv.index("--num_processes") + 1] == "2" and "rlhf_cli.cli_generate" in argv


@pytest.mark.parametrize("extra, message", [
    (sets("launch.deepspeed=zero2.json"), "--set launch.deepspeed: rlhf generate only samples"),
    (sets("launch.mixed_precision=bf16"), "--set launch.mixed_precision: rlhf generate samples in"),
    (sets("launch.num_machines=2"), "--set launch.num_machines: several machines need"),
    (sets("launch.num_machines=2", "launch.machine_rank=2", "launch.main_process_ip=h"),
     "--set launch.machine_rank: must be below launch.num_machines"),
    (sets("launch.num_processes=0"), "--set launch.num_processes: must be >= 1, got 0"),
    (sets("launch.launcher=mpirun"), "--set launch.launcher"),
    (sets("launch.nproc=2"), "unknown key `launch.nproc`"),
    (sets("train.lr=1"), "--set train.lr: only `launch.KEY=VALUE` can be set here"),
    ([*sets("launch.num_processes=3"), "--num-processes", "2"],
     "--num-processes: 2 disagrees with --set launch.num_processes=3"),
    (["--num-processes", "0"], "--num-processes: must be at least 1, got 0"),
])
def test_bad_launch_options_are_one_error_line(in_process, launched, tmp_path, capsys, extra, message):
    assert in_process(*ARGS, *extra) == 2
    assert message in error_line(capsys.readouterr().err)
    assert launched == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
