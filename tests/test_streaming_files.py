"""Data sets larger than memory, from the files: each format's reader indexes rows instead of
holding them (JSON lists in chunks, parquet a batch at a time, CSV and JSON lines by offset,
hub datasets from their cache), and the slow tests measure a child process's peak resident
memory (ru_maxrss) on 10k and 1M rows through the real readers, builders and CLI: the
difference must stay small. The lazy examples themselves: test_streaming.py.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_cli.data import arrow_rows, csv_rows, json_array
from rlhf_cli.data.files import load_rows
from rlhf_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ files


def test_json_list_is_indexed_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(json_array, "CHUNK", 64)  # many refills and compactions
    rows = [{"prompt": f"é{i} " + "ü" * (i % 9), "response": [i, {"x": "\"]}"}]} for i in range(300)]
    for name, data, indent in [("list", rows, None), ("data", {"meta": {"a": [1]}, "data": rows}, 1),
                               ("train", {"train": rows}, 2)]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data, indent=indent, ensure_ascii=False), encoding="utf-8")
        loaded = load_rows(str(path))
        assert isinstance(loaded, json_array.JsonArrayRows)
        assert list(loaded) == rows and loaded[-7] == rows[-7]
        assert loaded.locations[4] == f"{path} row 5" and loaded[2:4].locations[1] == f"{path} row 4"
    lines = json.dumps(rows, indent=1).splitlines()
    deep = next(i for i in range(700, len(lines)) if lines[i] == " },")
    lines[deep] = " }"  # a missing comma between two rows deep in the file
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines))
    with pytest.raises(UserError, match="malformed JSON") as err:
        load_rows(str(path))
    with pytest.raises(json.JSONDecodeError) as truth:
        json.loads(path.read_text())
    assert err.value.where == f"{path}:{truth.value.lineno}"
    assert f"column {truth.value.colno}" in str(err.value)
    path.write_text(json.dumps([*rows[:250], [1], *rows[250:]]))
    with pytest.raises(UserError, match="expected a JSON object, got list") as err:
        load_rows(str(path))
    assert err.value.where == f"{path} row 251"


def test_parquet_is_read_a_batch_at_a_time(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"sort {i}"}], "n": i if i % 3 else None}
            for i in range(3 * arrow_rows.BATCH_ROWS + 17)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    loaded = load_rows(str(path))
    assert isinstance(loaded, arrow_rows.ArrowRows) and len(loaded._starts) > 4
    assert list(loaded) == pq.read_table(path).to_pylist() == rows
    picks = random.Random(0).sample(range(len(rows)), 50)
    assert [loaded[i] for i in picks] == [rows[i] for i in picks]
    assert loaded[-1] == rows[-1] and loaded.locations[700] == f"{path} row 701"


def test_csv_is_indexed_like_json_lines(tmp_path):
    import pandas as pd

    rows = [{"instruction": f"sort {i}", "input": "" if i % 3 else "x,\n\"y\"", "output": f"{i}.0"}
            for i in range(40)]
    path = tmp_path / "d.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    path.write_text(path.read_text() + "\n")  # a blank line at the end
    loaded = load_rows(str(path))
    assert isinstance(loaded, csv_rows.CsvRows)
    assert list(loaded) == rows == pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
    assert loaded[-1] == rows[-1] and loaded[4] == rows[4]
    # Each row's own line, though the cells of rows 0, 3, ... hold a newline.
    assert loaded.locations[0] == f"{path}:2" and loaded.locations[1] == f"{path}:4"
    assert loaded.locations[4] == f"{path}:8"  # rows 0 and 3 take two lines each
    (tmp_path / "bad.csv").write_text('a,b\n1,"2\n2"\n3,4,5\n')
    with pytest.raises(UserError, match="expected 2 fields as in the header, got 3") as err:
        load_rows(str(tmp_path / "bad.csv"))
    assert err.value.where == f"{tmp_path / 'bad.csv'}:4"


def test_hub_rows_are_read_from_the_dataset_not_copied(monkeypatch):
    import datasets

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": None if i == 2 else f"r{i}"}
            for i in range(5)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(rows))
    loaded = load_rows("org/name")
    assert isinstance(loaded, arrow_rows.HubRows) and isinstance(loaded.dataset, datasets.Dataset)
    assert list(loaded) == rows and loaded[-1] == rows[-1] and loaded[1:3] == rows[1:3]
    assert loaded.locations[3] == "org/name row 4"


# ------------------------------------------------------------------ memory, measured


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("RLHF_DEBUG", None)
    return env


# Runs argv as its child and reports that child's peak RSS. Not measured from this test process:
# Linux carries the peak RSS of the process that forks across exec, so a child of pytest (which
# built the test data) would report pytest's peak; a child of this small process reports its own.
MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    code = subprocess.call(sys.argv[1:])
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    sys.exit(code)
""")


def peak_rss_mb(argv: list[str], cwd: Path, timeout: float = 400) -> tuple[float, str]:
    """Run argv; its peak resident memory (ru_maxrss) in MB, and its output."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=cwd, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("peak_rss_kb "), proc.stdout[-3000:]
    return int(lines[-1].split()[1]) / 1024, "\n".join(lines[:-1])


def write_sft_jsonl(path: Path, n: int) -> Path:
    with path.open("w") as handle:
        for start in range(0, n, 10_000):
            handle.write("".join(json.dumps({"prompt": f"sort {i:07d} =", "response": f" {i}"})
                                 + "\n" for i in range(start, min(n, start + 10_000))))
    return path


def write_pairs(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"prompt": [f"sort {i:07d} =" for i in range(n)], "chosen": [f" {i}" for i in range(n)],
               "rejected": [f" {i + 1}" for i in range(n)]}
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=10_000)
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    elif path.suffix == ".json":
        with path.open("w") as handle:
            handle.write("[" + ",\n".join(json.dumps(r) for r in table.to_pylist()) + "]")
    elif path.suffix == ".gz":
        with gzip.open(path, "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in table.to_pylist())
    return path


READ_ALL = textwrap.dedent("""
    import json, random, resource, sys, time
    from rlhf_cli.data.files import load_rows
    start = time.perf_counter()
    rows = load_rows(sys.argv[1])
    loaded = time.perf_counter() - start
    count = sum(1 for _ in rows)
    picks = [rows[i] for i in random.Random(0).sample(range(len(rows)), 2000)]
    assert count == len(rows) and all(isinstance(r, dict) for r in picks)
    print(json.dumps({"rows": count, "load_s": loaded, "last": rows[-1]}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl.gz"])
def test_a_million_rows_of_any_format_are_read_in_flat_memory(suffix, tmp_path):
    """Loaded, iterated and read at random: the rows are never all in memory."""
    peaks = {}
    for n in (10_000, 1_000_000):
        path = write_pairs(tmp_path / f"pairs-{n}{suffix}", n)
        peaks[n], text = peak_rss_mb([sys.executable, "-c", READ_ALL, str(path)], tmp_path)
        report = json.loads(text.splitlines()[-1])
        assert report["rows"] == n and report["last"]["chosen"] == f" {n - 1}"
        path.unlink()
    print(f"{suffix}: peak RSS {peaks} MB")  # shown with pytest -s
    # Index: 16 bytes a row for .csv / .json / .jsonl.gz, 8 bytes a batch for parquet (plus one
    # row group decoded at a time). As dicts, the rows alone take ~300 MB.
    assert peaks[1_000_000] - peaks[10_000] < 40, peaks


BUILD = textwrap.dedent("""
    import json, sys, time
    from rlhf_cli.builtin.tokenizer import build_tokenizer
    from rlhf_cli.data.files import load_rows
    from rlhf_cli.data.preference import build_preference_dataset
    from rlhf_cli.engine.batching import GlobalBatches
    rows = load_rows(sys.argv[1])
    start = time.perf_counter()
    pairs, report = build_preference_dataset(rows, build_tokenizer(), "plain", 64, None, sys.argv[1])
    seconds = time.perf_counter() - start
    if len(sys.argv) > 2:  # what the builder did before it was lazy: a list of every example
        pairs = list(pairs)
    batches = GlobalBatches(len(pairs), 8, 1, 1, 0, seed=0)
    for step in range(50):
        assert len([pairs[i] for i in batches.micro_batches(step)[0]]) == 8
    print(json.dumps({"summary": report.summary(), "seconds": seconds}))
""")


@pytest.mark.slow
def test_the_builders_keep_memory_flat(tmp_path):
    """Preference pairs (the biggest examples) from parquet: 10k against 60k rows."""
    peaks, texts = {}, {}
    for n in (10_000, 60_000):
        path = write_pairs(tmp_path / f"pairs-{n}.parquet", n)
        peaks[n], texts[n] = peak_rss_mb([sys.executable, "-c", BUILD, str(path)], tmp_path)
        assert f"kept all {n} rows" in texts[n]
    print(f"preference builder: peak RSS {peaks} MB; {texts}")
    # Kept index 12 bytes a pair (0.6 MB for 50k more); as a list the pairs took ~1.5 KB each.
    assert peaks[60_000] - peaks[10_000] < 12, (peaks, texts)


LARGE_RUN_ROWS = 300_000


@pytest.mark.slow
def test_a_large_sft_run_starts_in_flat_memory(rlhf_home, tmp_path):
    """`rlhf sft` on 10k and on 300k rows of .jsonl, a few steps each: same peak memory.

    300k rather than 1M rows keeps the start-up pass (~70 us a row, one core) within the
    suite's time; the readers are checked on 1M rows above."""
    peaks, texts = {}, {}
    for n in (10_000, LARGE_RUN_ROWS):
        data = write_sft_jsonl(tmp_path / f"sft-{n}.jsonl", n)
        argv = [sys.executable, "-m", "rlhf_cli.cli", "sft", "--recipe",
                str(REPO / "recipes" / "tiny-sft.yaml"), "--set", f"data.train={data}",
                "--set", "data.eval=null", "--set", "data.max_length=32",
                "--set", "train.eval_reward_fn=null", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", "--set", "train.max_steps=3",
                "--set", "train.log_every=1", "-o", f"run-{n}"]
        start = time.perf_counter()
        peaks[n], texts[n] = peak_rss_mb(argv, tmp_path, timeout=500)
        texts[n] += f"\n[{time.perf_counter() - start:.1f} s]"
        assert f"data.train: kept all {n} rows" in texts[n]
        assert (tmp_path / f"run-{n}" / "final").is_dir()
    print(f"rlhf sft: peak RSS {peaks} MB; " + " ".join(t.splitlines()[-1] for t in texts.values()))
    # Per 1M rows: line index 16 MB, kept index 8 MB, batch order 4 MB; the examples as lists
    # took ~700 MB (~210 MB for 300k rows).
    assert peaks[LARGE_RUN_ROWS] - peaks[10_000] < 30, (peaks, texts)
