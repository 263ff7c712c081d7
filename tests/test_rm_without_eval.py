"""`rlhf rm` with no `data.eval`: the reward statistics come from training pairs, and the run
finishes with exit 0 (it used to save final/ and then die in its closing summary)."""

from __future__ import annotations

import json

from cli_helpers import REPO, rlhf

RM_RECIPE = REPO / "recipes" / "tiny-rm.yaml"


def test_rm_without_eval_data_finishes_and_stores_train_statistics(rlhf_home, tmp_path):
    proc = rlhf("rm", "--recipe", str(RM_RECIPE), "-o", "run",
                "--set", "data.eval=null", "--set", "train.eval_every=null",
                "--set", "data.train=builtin:sort:train:16", "--set", "train.batch_size=4",
                "--set", "train.max_steps=2", "--set", "train.save_every=null", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    stats = json.loads((tmp_path / "run" / "final" / "reward_stats.json").read_text())
    assert stats["source"] == "train"
    assert 0.0 <= stats["accuracy"] <= 1.0 and stats["std"] >= 0.0
    # The closing line says where the statistics came from (16 training pairs, no held-out set).
    assert "on 16 training pairs" in proc.stdout + proc.stderr
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["end_time"], "run.json is closed only when the stage returned"
