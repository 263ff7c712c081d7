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
