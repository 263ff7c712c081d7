"""The benchmark scripts parse their arguments and write recipes our schema accepts (no training,
no trl, nothing timed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from rlhf_cli.config import build_recipe

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_dpo  # noqa: E402
import bench_ppo  # noqa: E402
import bench_sft  # noqa: E402


def test_window_must_match_the_log_cadence():
    with pytest.raises(SystemExit):
        bench_sft.parse_args(["--steps", "15", "--log-every", "10"])
    with pytest.raises(SystemExit):
        bench_dpo.parse_args(["--repeats", "0"])
    with pytest.raises(SystemExit):
        bench_ppo.parse_args(["--iterations", "2", "--warmup-iterations", "2"])


def test_recipes_the_benches_write_are_valid(tmp_path):
    sft = bench_sft.parse_args(["--repeats", "2"])
    dpo = bench_dpo.parse_args(["--precompute-ref"])
    ppo = bench_ppo.parse_args([])
    assert (sft.repeats, dpo.lora_dropout, dpo.precompute_ref) == (2, 0.0, True)
    data = tmp_path / "rows.jsonl"
    texts = [bench_sft.our_recipe(sft, data, 40), bench_dpo.our_recipe(dpo, data, 40),
             bench_ppo.rm_recipe(ppo, data)]
    texts += [bench_ppo.ppo_recipe(ppo, name, data, tmp_path / "rm") for name in bench_ppo.ARRANGEMENTS]
    for text in texts:
        recipe = build_recipe(yaml.safe_load(text))
        assert recipe.model.lora.dropout == (0.05 if recipe.stage == "sft" else 0.0)
    assert build_recipe(yaml.safe_load(texts[1])).dpo.precompute_ref is True


def test_the_qlora_bench_writes_a_4bit_and_a_bf16_recipe(tmp_path):
    import bench_qlora

    args = bench_qlora.parse_args([])
    assert (args.model, args.dtype, args.quantization) == ("large", "bf16", None)
    for side, quantization in bench_qlora.SIDES.items():
        text = bench_qlora.side_recipe(args, side, tmp_path / "p.jsonl", tmp_path / "rm")
        recipe = build_recipe(yaml.safe_load(text))
        assert (recipe.model.quantization, recipe.model.dtype) == (quantization, "bf16"), side


def test_the_generate_bench_refuses_empty_counts():
    import bench_generate

    assert bench_generate.parse_args([]).model == "small"
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--n", "0"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_the_phase_trace_finds_a_phase_peak_and_keeps_it_in_the_enclosing_phase(monkeypatch):
    import trace_phases

    import rlhf_cli.stages.ppo.run as run
    import rlhf_cli.stages.ppo.update as update

    tracer = trace_phases.Tracer()
    tracer.enter("outer")
    tracer.enter("inner")
    block = b"\1" * (64 * 2**20)  # written, so resident; freed before the phases end
    del block
    tracer.leave()
    tracer.leave()
    inner, outer = tracer.records
    assert inner["peak"] - inner["rss_out"] >= 60 and outer["peak"] >= inner["peak"]
    # Every phase it wraps is still where PPO looks it up (restored after the test).
    targets = [(run, "sample"), (run, "make_experience"), (update, "minibatch_loss"), (update, "_run_passes"),
               (update, "minibatch_update"), (run.PPO, "score"), (run.PPO, "iteration")]
    for owner, name in targets:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    trace_phases.instrument(tracer)
    assert all(getattr(owner, name).__wrapped__ for owner, name in targets)
