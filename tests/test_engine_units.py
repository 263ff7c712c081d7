"""Schedule, batching and launcher argv: pure functions checked by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_cli.engine.batching import GlobalBatches
from rlhf_cli.engine.optim import lr_factor
from rlhf_cli.errors import UserError
from rlhf_cli.launcher import needs_launcher, worker_argv
from rlhf_cli.schema import LaunchSection

REPO = Path(__file__).resolve().parent.parent


def test_warmup_then_cosine():
    # 10 steps, 2 warmup: factors 0.5, 1.0, then cosine over the remaining 8
    assert lr_factor(0, 10, 2, "cosine", 0.0) == 0.5
    assert lr_factor(1, 10, 2, "cosine", 0.0) == 1.0
    assert lr_factor(2, 10, 2, "cosine", 0.0) == 1.0
    assert lr_factor(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(10, 10, 2, "cosine", 0.0) == pytest.approx(0.0)


def test_linear_and_min_ratio():
    assert lr_factor(5, 10, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "linear", 0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 0, "constant", 0.0) == 1.0


def test_batches_partition_global_batch_across_ranks():
    per_rank = [GlobalBatches(64, 2, 2, 2, r, seed=1).micro_batches(3) for r in range(2)]
    seen = sorted(i for rank in per_rank for mb in rank for i in mb)
    assert len(seen) == 8 and len(set(seen)) == 8
    one = GlobalBatches(64, 8, 1, 1, 0, seed=1).micro_batches(3)
    assert sorted(one[0]) == seen  # same 8 examples as 2 ranks x 2 x 2


def test_accumulation_sees_same_examples():
    big = GlobalBatches(40, 8, 1, 1, 0, seed=3).micro_batches(2)
    small = GlobalBatches(40, 1, 8, 1, 0, seed=3).micro_batches(2)
    assert big[0] == [i for mb in small for i in mb]


def test_epochs_reshuffle_and_total_steps():
    batches = GlobalBatches(10, 2, 1, 1, 0, seed=0)
    assert batches.steps_per_epoch == 5
    assert batches.total_steps(2.0, None) == 10 and batches.total_steps(1.0, 3) == 3
    first = [i for s in range(5) for mb in batches.micro_batches(s) for i in mb]
    second = [i for s in range(5, 10) for mb in batches.micro_batches(s) for i in mb]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_too_little_data():
    with pytest.raises(UserError, match="fewer than one global batch"):
        GlobalBatches(3, 4, 1, 1, 0, seed=0)


def test_launcher_argv():
    single = LaunchSection()
    assert not needs_launcher(single)
    assert worker_argv(single, "run/recipe.yaml", resume=True)[-3:] == [
        "rlhf_cli.worker", "run/recipe.yaml", "--resume"]
    two = LaunchSection(num_processes=2)
    argv = worker_argv(two, "r.yaml", resume=False)
    assert "torch.distributed.run" in argv and "--nproc_per_node=2" in argv
    multi = LaunchSection(num_processes=8, num_machines=2, machine_rank=1,
                          main_process_ip="10.0.0.1", main_process_port=29501)
    argv = worker_argv(multi, "r.yaml", resume=False)
    for flag in ("--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29501"):
        assert flag in argv
    accel = LaunchSection(launcher="accelerate", num_processes=2, mixed_precision="bf16")
    argv = worker_argv(accel, "r.yaml", resume=False)
    assert "accelerate.commands.launch" in argv and "bf16" in argv
    ds = LaunchSection(deepspeed="recipes/deepspeed/zero2.json")
    assert "torch.distributed.run" in worker_argv(ds, "r.yaml", resume=False)


def test_gradient_checkpointing_recomputes_the_same_lora_gradients(rlhf_home):
    """Checkpointing trades memory for a second forward; losses and LoRA gradients stay equal."""
    import torch

    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.lm_forward import sequence_logprobs
    from rlhf_cli.models.policy import policy_model

    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 2, 3, 3]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))

    def loss_and_grads(checkpointing: bool):
        recipe = load_recipe(REPO / "recipes" / "tiny-sft.yaml",
                             [f"model.gradient_checkpointing={checkpointing}", "model.lora.dropout=0.0"])
        torch.manual_seed(0)
        model = policy_model(recipe, announce=False).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        loss = -sequence_logprobs(model, ids, mask, labels)[0].sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    loss_plain, plain = loss_and_grads(False)
    loss_ckpt, ckpt = loss_and_grads(True)
    assert loss_ckpt == loss_plain
    assert plain.keys() == ckpt.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
