"""`rlhf merge-lora`: the merged model equals base + adapter, and needs neither peft nor rlhf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_env, rlhf, run_in

RECIPE = REPO / "recipes" / "tiny-sft.yaml"
TEXTS = ["sort dbca =", "sort lkjihg = ghijkl", "The quick brown fox."]

# Loads the merged directory in a bare interpreter where importing peft or rlhf_cli fails,
# then prints its logits for TEXTS as JSON.
PLAIN_LOAD = """
import json, sys
sys.modules["peft"] = None  # any `import peft` now raises ImportError
sys.modules["rlhf_cli"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
out = []
with torch.no_grad():
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out.append({"ids": ids[0].tolist(), "logits": model(ids).logits[0].tolist()})
print(json.dumps({"type": type(model).__name__, "out": out}))
"""


@pytest.fixture(scope="module")
def trained_run(rlhf_home, tmp_path_factory) -> Path:
    run, _ = run_in(tmp_path_factory.mktemp("merge"), "sft", "--recipe", str(RECIPE),
                    "--set", "data.max_length=32", "--set", "train.batch_size=16",
                    "--set", "train.max_steps=10", "--set", "train.warmup_steps=2",
                    "--set", "train.eval_reward_fn=null", "--set", "train.eval_every=null",
                    "--set", "data.eval=null", "--set", "train.save_every=null")
    return run


@pytest.mark.slow
def test_merged_model_equals_adapter_without_peft(trained_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    proc = rlhf("merge-lora", str(trained_run), "--out", str(merged), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    assert not merged.with_name("merged.tmp").exists()

    # No `PYTHONPATH` to the repo: only an installed rlhf_cli could be found, and it is blocked.
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged), json.dumps(TEXTS)],
                           cwd=tmp_path, env=cli_env(pythonpath=False), capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr
    result = json.loads(plain.stdout.splitlines()[-1])
    assert result["type"] == "LlamaForCausalLM"

    final = trained_run / "final"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain_base = AutoModelForCausalLM.from_pretrained(base).eval()
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                 final).eval()
        with torch.no_grad():
            for item in result["out"]:
                ids = torch.tensor([item["ids"]])
                expected = with_adapter(ids).logits[0]
                got = torch.tensor(item["logits"])
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
                # ... and the adapter did change the model, so the check above means something.
                assert (plain_base(ids).logits[0] - expected).abs().max() > 1e-2
    finally:
        torch.set_num_threads(threads)
    # The merged directory carries the run's tokenizer: same ids as the adapter's.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    assert [item["ids"] for item in result["out"]] == [tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.mark.slow
def test_merge_refuses_to_overwrite(trained_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = rlhf("merge-lora", str(trained_run), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and not (out / "config.json").exists()
