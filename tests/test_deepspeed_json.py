"""A malformed `launch.deepspeed` JSON is an `error:` line naming the file, line and column,
found in the launching process before any worker starts (and by --dry-run), with nothing
written to the output directory."""

from __future__ import annotations

import pytest
from cli_helpers import REPO, error_line, rlhf

SFT_RECIPE = REPO / "recipes" / "tiny-sft.yaml"
# A trailing comma: line 3, column 5 is where a property name was expected.
BROKEN = '{\n  "zero_optimization": {"stage": 2},\n    }\n'


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_malformed_deepspeed_json_is_reported_before_launch(rlhf_home, tmp_path, dry_run):
    config = tmp_path / "broken.json"
    config.write_text(BROKEN)
    extra = ["--dry-run"] if dry_run else []
    proc = rlhf("sft", "--recipe", str(SFT_RECIPE), "-o", "run", *extra,
                "--set", f"launch.deepspeed={config}", "--set", "launch.num_processes=2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert line.startswith(f"error: launch.deepspeed: {config} line 3 column 5: "), line
    assert "Expecting property name" in line
    assert "launching:" not in proc.stderr  # no torchrun, so no worker
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object"),
                                           ('{"a": 1} x', "line 1 column 10: Extra data")])
def test_deepspeed_json_reader_names_the_file(tmp_path, text, message):
    from rlhf_cli.errors import UserError
    from rlhf_cli.preflight import read_deepspeed_json

    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        read_deepspeed_json(path)
    assert str(caught.value) == f"launch.deepspeed: {path}{'' if 'line' in message else ':'} {message}"
