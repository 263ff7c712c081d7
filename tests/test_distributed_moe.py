"""LoRA on MoE experts (peft's ParamWrapper on stacked 3-D expert weights, lora_targets.py)
under DeepSpeed ZeRO-3 on two real CPU processes, every weight sharded: two processes must
reproduce one process with the same global batch (fp32, no dropout), as in
test_distributed.py and test_distributed_ppo.py.

- SFT on Mixtral and Qwen3-MoE: the same losses and the same saved adapter.
- PPO 1base-2lora with ptx on Mixtral: under ZeRO-3 one forward runs each MoE block three
  times (actor, critic, SFT batch). With DeepSpeed's default leaf modules (the MoE blocks)
  that failed in ZeRO-3's gradient reduction (an assertion on a weight in the reduce bucket
  twice); models/zero3.py explains the fix. The same metrics and final/ as one process.

- A DeepSpeed JSON that sets its own leaf_module (the MoE blocks) where PPO runs a block twice
  in one backward (1base-2lora, ptx): one `error:` line at model setup, not DeepSpeed's assertion.

What the DeepSpeed backend's prepare() does with the wrappers and a JSON's own leaf modules is
checked fast in test_zero3_prepare.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_env
from distributed_helpers import with_own_leaf_module, zero3_every_weight_sharded
from families import save_family
from safetensors.torch import load_file
from test_families_e2e import SFT_ROWS
from test_zero3_prepare import MIXTRAL_BLOCK

REL_TOL = 1e-4  # fp32 runs that differ in summation order only (measured <= 8e-6)
SFT_STEPS, PPO_ITERATIONS, GLOBAL_BATCH = 3, 2, 8
SFT_SETTINGS = [
    f"train.max_steps={SFT_STEPS}", "train.log_every=1", "data.max_length=32", "data.eval=null",
    "train.eval_every=null", "train.save_every=null", "train.eval_reward_fn=null", "model.dtype=fp32",
    "model.lora.dropout=0.0",
]
PPO_SETTINGS = [
    f"train.max_steps={PPO_ITERATIONS}", "train.log_every=1", "train.eval_every=null",
    "train.save_every=null", "train.eval_reward_fn=null", "data.eval=null", "ppo.ppo_epochs=2",
    "ppo.top_k=1", "ppo.max_new_tokens=6",
    "model.lora.dropout=0.0", "ppo.reward_fn=null", "ppo.ptx_coef=0.3", "ppo.ptx_data=builtin:sort",
]
PPO_COMPARED = ("score", "kl", "loss", "policy_loss", "value_loss", "ptx_loss", "entropy", "approx_kl",
                "grad_norm")


def launch(work: Path, stage: str, recipe: str, out: str, settings: list[str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "rlhf_cli.cli", stage, "--recipe", str(REPO / "recipes" / recipe),
            "-o", out]
    for setting in settings:
        argv += ["--set", setting]
    return subprocess.run(argv, cwd=work, env=cli_env(), capture_output=True, text=True, timeout=300)


def rlhf(work: Path, stage: str, recipe: str, out: str, settings: list[str]) -> Path:
    done = launch(work, stage, recipe, out, settings)
    assert done.returncode == 0, done.stderr[-4000:]
    return work / out


def on_two_zero3_processes(work: Path, *settings: str) -> list[str]:
    return [*settings, "launch.num_processes=2", f"launch.deepspeed={zero3_every_weight_sharded(work)}"]


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") != "eval"]


def assert_same_rows(run: Path, reference: Path, keys: tuple[str, ...], steps: int) -> None:
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    got, want = train_rows(run), train_rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for row, expected in zip(got, want, strict=True):
        for key in keys:
            assert math.isfinite(row[key]), (row["step"], key)
            assert row[key] == pytest.approx(expected[key], rel=REL_TOL, abs=1e-6), (row["step"], key)


def assert_same_weights(run: Path, reference: Path, name: str) -> dict:
    got, want = load_file(str(run / "final" / name)), load_file(str(reference / "final" / name))
    assert got.keys() == want.keys() and got
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape and got[key].numel() > 0, key
        assert (got[key] - tensor).abs().max().item() < 1e-5, key
    return got


def assert_experts_trained(adapter: dict) -> None:
    lora_b = [v for k, v in adapter.items() if ".experts." in k and "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)  # 2 layers x 2 expert weights


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_zero3_sft_with_expert_lora_matches_one_process(family, rlhf_home, tmp_path):
    base = save_family(family, tmp_path / "base")
    data = tmp_path / "sft.jsonl"  # as many rows as the global batch: each step sees all of them
    data.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS * 2))
    settings = [*SFT_SETTINGS, f"model.base={base}", f"data.train={data}"]
    single = rlhf(tmp_path, "sft", "tiny-sft.yaml", "single", [*settings, f"train.batch_size={GLOBAL_BATCH}"])
    zero3 = rlhf(tmp_path, "sft", "tiny-sft.yaml", "zero3",
                 on_two_zero3_processes(tmp_path, *settings, f"train.batch_size={GLOBAL_BATCH // 2}"))
    assert_same_rows(zero3, single, ("loss", "grad_norm"), SFT_STEPS)
    assert_experts_trained(assert_same_weights(zero3, single, "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_ppo_1base_2lora_with_ptx_on_moe_matches_one_process(rlhf_home, tmp_path):
    """Actor, critic and the ptx batch through the same expert weights in one forward."""
    base = save_family("mixtral", tmp_path / "base")
    rm = rlhf(tmp_path, "rm", "tiny-rm.yaml", "rm", [
        f"model.base={base}", "train.max_steps=2", "train.batch_size=4", "data.max_length=32",
        "train.eval_every=null", "train.save_every=null"])
    settings = [*PPO_SETTINGS, f"model.base={base}", f"ppo.reward_model={rm}"]

    def per_process(size: int) -> list[str]:
        return [f"ppo.rollout_batch_size={size}", f"ppo.mini_batch_size={size}",
                f"ppo.ptx_batch_size={size // 2}"]

    recipe = "tiny-ppo-1base-2lora.yaml"
    single = rlhf(tmp_path, "ppo", recipe, "single", [*settings, *per_process(GLOBAL_BATCH)])
    zero3 = rlhf(tmp_path, "ppo", recipe, "zero3",
                 on_two_zero3_processes(tmp_path, *settings, *per_process(GLOBAL_BATCH // 2)))
    assert train_rows(single)[-1]["kl"] > 0.1  # the policy moved: the second row checks an update
    assert_same_rows(zero3, single, PPO_COMPARED, PPO_ITERATIONS)
    assert_experts_trained(assert_same_weights(zero3, single, "adapter_model.safetensors"))
    assert_same_weights(zero3, single, "value_head.safetensors")


# A leaf module reduces its weights' gradients each time its backward runs: where one backward
# runs an MoE block twice, the old code failed deep in DeepSpeed (exit 1, a traceback ending in
# `assert len(set(p.ds_id for p in params_in_bucket)) == len(params_in_bucket)`). Measured on
# tiny Mixtral, 2 processes: 1base-1lora without ptx, SFT and DPO ran with that leaf_module.
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("recipe", "twice"), [
    ("tiny-ppo-1base-2lora.yaml", "ppo.arrangement 1base-2lora"),
    ("tiny-ppo-1base-1lora.yaml", "ppo.ptx_coef"),
])
def test_a_json_leaf_module_that_a_run_passes_twice_is_an_error(recipe, twice, rlhf_home, tmp_path):
    base = save_family("mixtral", tmp_path / "base")
    config = with_own_leaf_module(zero3_every_weight_sharded(tmp_path), [MIXTRAL_BLOCK])
    settings = [*PPO_SETTINGS, f"model.base={base}", "ppo.reward_fn=rlhf_cli.builtin.tasks:sort_reward",
                "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.ptx_batch_size=2",
                "launch.num_processes=2", f"launch.deepspeed={config}"]
    if twice != "ppo.ptx_coef":
        settings.append("ppo.ptx_coef=0")
    done = launch(tmp_path, "ppo", recipe, "run", settings)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-4000:]
    assert errors[0].startswith(f"error: launch.deepspeed: zero_optimization.leaf_module in {config} makes "
                                "MixtralSparseMoeBlock ZeRO-3 leaf modules")
    assert twice in errors[0] and "Remove leaf_module" in errors[0]
    assert not (tmp_path / "run").exists()
