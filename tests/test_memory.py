"""Memory the process holds: freed heap goes back to the system between phases (glibc), and
libraries a run does not use stay unimported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from cli_helpers import REPO, cli_env

from rlhf_cli.engine.memory import release_freed_memory


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_blocks_leave_rss_only_after_release():
    blocks = [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KiB each: heap, not mmap
    pinned = torch.ones(16 * 1024)  # above them, so that glibc cannot shrink the heap's top
    del blocks
    before = rss_mib()
    assert release_freed_memory()
    after = rss_mib()
    assert before - after > 60, (before, after)  # ~125 MiB were freed but still resident
    assert pinned.sum() == 16 * 1024


def test_a_run_without_deepspeed_does_not_import_it(tmp_path):
    """accelerate's `unwrap_model` imports deepspeed whenever it is installed: 22 MiB more RSS
    in every process, though only DeepSpeed runs use it. PPO (1base-1lora) unwraps at start
    and when it saves."""
    code = ("import sys\nfrom rlhf_cli.cli import main\n"
            "assert main(sys.argv[1:]) == 0\n"
            "print('deepspeed imported:', 'deepspeed' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "ppo", "--recipe", "recipes/tiny-ppo-1base-1lora.yaml",
                           "--set", "train.max_steps=1", "-o", str(tmp_path / "run")],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "final").is_dir()
    assert proc.stdout.strip().splitlines()[-1] == "deepspeed imported: False"
