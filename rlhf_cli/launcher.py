"""Recipe -> the command that runs it. Building the argv is pure; `run` is the one subprocess.

One process runs in this Python process. Several processes (or DeepSpeed) go through
`torchrun`, which gives every worker RANK/WORLD_SIZE/MASTER_ADDR; the worker then picks
accelerate (DDP) or DeepSpeed itself. torchrun is the default because on CPU-only
machines `accelerate launch --cpu --num_processes 2` starts a single process, while
torchrun gives two gloo ranks; on GPUs both work. `launch.launcher: accelerate` uses
`accelerate launch` for users who want its config handling.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from .schema import LaunchSection

WORKER_MODULE = "rlhf_cli.worker"


def needs_launcher(launch: LaunchSection) -> bool:
    if launch.launcher == "none":
        return False
    return (
        launch.num_processes * launch.num_machines > 1
        or launch.deepspeed is not None
        or launch.launcher in ("torchrun", "accelerate")
    )


def _torchrun_argv(launch: LaunchSection) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.num_processes}"]
    if launch.num_machines > 1:
        argv += [
            f"--nnodes={launch.num_machines}",
            f"--node_rank={launch.machine_rank}",
            f"--master_addr={launch.main_process_ip}",
            f"--master_port={launch.main_process_port}",
        ]
    else:
        # A free port per run, so two runs on one machine do not collide.
        argv += ["--standalone"]
    return argv + ["-m", WORKER_MODULE]


def _accelerate_argv(launch: LaunchSection) -> list[str]:
    argv = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(launch.num_processes * launch.num_machines),
        "--num_machines", str(launch.num_machines),
        "--mixed_precision", launch.mixed_precision,
        "--dynamo_backend", "no",
    ]
    if launch.num_machines > 1:
        argv += [
            "--machine_rank", str(launch.machine_rank),
            "--main_process_ip", str(launch.main_process_ip),
            "--main_process_port", str(launch.main_process_port),
        ]
    if launch.num_processes * launch.num_machines > 1:
        argv += ["--multi_gpu"]
    if launch.cpu:
        argv += ["--cpu"]
    return argv + ["-m", WORKER_MODULE]


def worker_argv(launch: LaunchSection, run_recipe: str, *, resume: bool) -> list[str]:
    """The exact command that trains `run_recipe` (the resolved recipe.yaml of a run)."""
    tail = [run_recipe] + (["--resume"] if resume else [])
    if not needs_launcher(launch):
        return [sys.executable, "-m", WORKER_MODULE, *tail]
    if launch.launcher == "accelerate" and launch.deepspeed is None:
        return _accelerate_argv(launch) + tail
    return _torchrun_argv(launch) + tail


def format_argv(argv: list[str]) -> str:
    return shlex.join(argv)


def run(argv: list[str]) -> int:
    """Run the workers and pass their exit status through."""
    env = dict(os.environ)
    # Workers print their own `error:` line; keep their output unbuffered and in order.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, _nproc(argv)))))
    return subprocess.call(argv, env=env)


def _nproc(argv: list[str]) -> int:
    for arg in argv:
        if arg.startswith("--nproc_per_node="):
            return int(arg.split("=", 1)[1])
    return 1
