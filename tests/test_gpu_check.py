"""scripts/gpu_check.sh, which needs a CUDA GPU: its no-GPU exit, its plan (dry mode), and the
memory metrics it reads from metrics.jsonl (peak CUDA memory beside the RSS)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
from cli_helpers import REPO, cli_env

from rlhf_cli.engine import memory


def test_memory_metrics_add_the_cuda_peak_only_where_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda_peak_mb" not in memory.memory_metrics()
    assert memory.memory_metrics()["rss_mb"] > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 + 2**19)
    assert memory.memory_metrics()["cuda_peak_mb"] == 3.5
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # never touched: no key
    assert "cuda_peak_mb" not in memory.memory_metrics()


SCRIPT = REPO / "scripts" / "gpu_check.sh"
ARRANGEMENTS = ("separate", "2base-2lora", "1base-2lora", "1base-1lora")


def gpu_check(tmp_path, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout)


def planned(stdout: str) -> list[list[str]]:
    """The `rlhf` commands the script printed (`+ python -m rlhf_cli.cli ARGS`), as ARGS."""
    commands = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]
    return [c[3:] for c in commands if c[1:3] == ["-m", "rlhf_cli.cli"]]


def settings(args: list[str]) -> dict[str, str]:
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return dict(pair.split("=", 1) for pair in pairs)  # later wins, as in the CLI


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = gpu_check(tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_the_plan_covers_every_stage_and_arrangement_in_bf16(tmp_path):
    proc = gpu_check(tmp_path, {"GPU_CHECK_DRY": "1", "GPU_CHECK_GPUS": "2"})
    assert proc.returncode == 0, proc.stderr
    commands = planned(proc.stdout)
    stages = [c[0] for c in commands]
    assert stages[:4] == ["sft", "merge-lora", "rm", "dpo"]
    assert stages.count("eval") == 1 and stages.count("merge-lora") == 2
    training = [c for c in commands if c[0] in ("sft", "rm", "dpo", "ppo")]
    for command in training:
        assert settings(command)["model.dtype"] == "bf16", command
        assert "launch.cpu" not in settings(command)  # on the GPU
    one_gpu = [settings(c) for c in training if c[0] == "ppo" and "launch.deepspeed" not in settings(c)]
    assert sorted(s["ppo.arrangement"] for s in one_gpu if "ppo.arrangement" in s) == sorted(ARRANGEMENTS)
    assert any(s.get("ppo.advantage") == "grpo" for s in one_gpu)
    zero = [settings(c) for c in training if "launch.deepspeed" in settings(c)]
    assert {s["launch.deepspeed"].rsplit("/", 1)[-1] for s in zero} == {"zero2.json", "zero3.json"}
    assert all(s["launch.num_processes"] == "2" for s in zero)
    assert settings(commands[0])["model.base"] == "builtin:base"
    # 4-bit: run where the key and bitsandbytes exist, else a line saying why not
    four_bit = [s for s in one_gpu if s.get("model.quantization") == "4bit"]
    assert four_bit or "skipped: " in proc.stdout
    assert "summary" in proc.stdout and not (tmp_path / "out").exists()  # dry: nothing ran


def test_every_planned_training_command_is_a_valid_recipe(tmp_path, monkeypatch):
    """Keys, values and combinations as `rlhf` validates them before it loads anything, so that
    a typo in the script shows here rather than on a lent GPU."""
    from rlhf_cli.config import load_recipe

    proc = gpu_check(tmp_path, {"GPU_CHECK_DRY": "1", "GPU_CHECK_GPUS": "2"})
    monkeypatch.chdir(REPO)  # the script runs from the repository root
    training = [c for c in planned(proc.stdout) if c[0] in ("sft", "rm", "dpo", "ppo")]
    assert len(training) >= 12
    for command in training:
        recipe_file = command[command.index("--recipe") + 1]
        sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
        recipe = load_recipe(recipe_file, sets, stage=command[0], output_dir=command[command.index("-o") + 1])
        assert recipe.model.dtype == "bf16"


def test_one_gpu_leaves_out_the_two_process_runs(tmp_path):
    proc = gpu_check(tmp_path, {"GPU_CHECK_DRY": "1", "GPU_CHECK_GPUS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert not any("launch.deepspeed" in settings(c) for c in planned(proc.stdout))
    assert "ZeRO-2/ZeRO-3 skipped: 1 GPU(s)" in proc.stdout


def test_summary_reads_peak_cuda_memory_and_time_per_iteration(tmp_path):
    run = tmp_path / "ppo-1base-1lora"
    run.mkdir()
    rows = [{"step": 1, "time_generate": 5.0, "time_score": 1.0, "time_train": 4.0, "cuda_peak_mb": 900.0},
            {"step": 2, "time_generate": 1.0, "time_score": 0.5, "time_train": 1.5, "cuda_peak_mb": 1200.0},
            {"step": 2, "split": "eval", "score": 0.1},
            {"step": 3, "time_generate": 1.5, "time_score": 0.5, "time_train": 2.0, "cuda_peak_mb": 1100.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ppo-merged").mkdir()  # not a run: left out
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_check_summary import ppo_figures, table
    finally:
        sys.path.pop(0)
    figures = ppo_figures(run)
    assert figures["sec_per_iter"] == 3.5  # iterations 2 and 3; the first warms up
    assert figures["cuda_peak_mb"] == 1200.0 and figures["iterations"] == 3
    lines = table(tmp_path)
    assert len(lines) == 2 and lines[1].split() == ["ppo-1base-1lora", "3", "3.50", "1200", "n/a"]


@pytest.mark.slow
def test_the_script_runs_every_step_on_the_cpu_with_a_tiny_model(tmp_path, rlhf_home):
    """Its steps for real, on the CPU and builtin:tiny (2.5 min here on a quiet machine, 6 on a
    busy one; on a GPU it uses builtin:base)."""
    proc = gpu_check(tmp_path, {"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_MODEL": "builtin:tiny",
                                "GPU_CHECK_GPUS": "0", "RLHF_HOME": str(rlhf_home)}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    table = proc.stdout[proc.stdout.index("ppo run"):].splitlines()
    names = {line.split()[0] for line in table[1:] if line.strip()}
    assert {f"ppo-{a}" for a in ARRANGEMENTS} | {"ppo-1base-1lora-grpo"} <= names
    assert json.loads((out / "eval.json").read_text())
    assert (out / "ppo-merged" / "config.json").is_file()
