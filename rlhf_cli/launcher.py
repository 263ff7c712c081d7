"""Recipe -> the command that runs it. Building the argv is pure; `run` is the one subprocess.

One process runs in this Python process. Several processes (or DeepSpeed) go through
`torchrun`, which gives every worker RANK/WORLD_SIZE/MASTER_ADDR; the worker then picks
accelerate (DDP) or DeepSpeed itself. torchrun is the default because on CPU-only
machines `accelerate launch --cpu --num_processes 2` starts a single process, while
torchrun gives two gloo ranks; on GPUs both work. `launch.launcher: accelerate` uses
`accelerate launch` for users who want its config handling.

A user error inside a worker (bad data, say) must still end `rlhf` with status 2 and one
`error:` line, but torchrun turns any failed worker into exit 1 and a ChildFailedError
traceback. So workers write the message to the file named by $RLHF_ERROR_FILE, the parent
prints it, and `run` starts torchrun through `torchrun_main` below: torchrun itself, except
that a failed worker is reported in one line instead of its traceback (`accelerate_main`
does the same for `accelerate launch`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import EXIT_USER_ERROR
from .schema import LaunchSection

WORKER_MODULE = "rlhf_cli.worker"
TORCHRUN_MODULE = "torch.distributed.run"
ACCELERATE_MODULE = "accelerate.commands.launch"
LAUNCHER_MODULE = "rlhf_cli.launcher"  # torchrun_main / accelerate_main below
ACCELERATE_FLAG = "--through-accelerate"
# Where a worker writes a user error's message for the parent to print (first rank wins).
ERROR_FILE_ENV = "RLHF_ERROR_FILE"


def needs_launcher(launch: LaunchSection) -> bool:
    if launch.launcher == "none":
        return False
    return (
        launch.num_processes * launch.num_machines > 1
        or launch.deepspeed is not None
        or launch.launcher in ("torchrun", "accelerate")
    )


def _torchrun_argv(launch: LaunchSection, module: str = WORKER_MODULE) -> list[str]:
    argv = [sys.executable, "-m", TORCHRUN_MODULE, f"--nproc_per_node={launch.num_processes}"]
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
    return argv + ["-m", module]


def _accelerate_argv(launch: LaunchSection, module: str = WORKER_MODULE) -> list[str]:
    argv = [
        sys.executable, "-m", ACCELERATE_MODULE,
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
    return argv + ["-m", module]


def worker_argv(launch: LaunchSection, run_recipe: str, *, resume: bool,
                module: str = WORKER_MODULE) -> list[str]:
    """The exact command that trains `run_recipe` (the resolved recipe.yaml of a run); `module`
    another rank entry point (`rlhf generate`'s) given one file to read."""
    tail = [run_recipe] + (["--resume"] if resume else [])
    if not needs_launcher(launch):
        return [sys.executable, "-m", module, *tail]
    if launch.launcher == "accelerate" and launch.deepspeed is None:
        return _accelerate_argv(launch, module) + tail
    return _torchrun_argv(launch, module) + tail


def format_argv(argv: list[str]) -> str:
    return shlex.join(argv)


def run(argv: list[str]) -> int:
    """Run the workers; 2 with one `error:` line when a worker hit a user error."""
    env = dict(os.environ)
    # Workers print their own progress; keep their output unbuffered and in order.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, _nproc(argv)))))
    with tempfile.TemporaryDirectory(prefix="rlhf-launch-") as tmp:
        error_file = Path(tmp) / "user_error"
        env[ERROR_FILE_ENV] = str(error_file)
        code = subprocess.call(_through_quiet_torchrun(argv), env=env)
        if error_file.is_file():
            print(f"error: {error_file.read_text(encoding='utf-8').strip()}", file=sys.stderr)
            return EXIT_USER_ERROR
    return code


def _nproc(argv: list[str]) -> int:
    for arg in argv:
        if arg.startswith("--nproc_per_node="):
            return int(arg.split("=", 1)[1])
    return 1


def _through_quiet_torchrun(argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run ARGS` -> `python -m rlhf_cli.launcher ARGS`, and
    `python -m accelerate.commands.launch ARGS` -> `... rlhf_cli.launcher --through-accelerate ARGS`."""
    if argv[1:3] == ["-m", TORCHRUN_MODULE]:
        return [argv[0], "-m", LAUNCHER_MODULE, *argv[3:]]
    if argv[1:3] == ["-m", ACCELERATE_MODULE]:
        return [argv[0], "-m", LAUNCHER_MODULE, ACCELERATE_FLAG, *argv[3:]]
    return argv


def torchrun_main(args: list[str]) -> int:
    """torchrun with readable failures: the worker's own output says what went wrong."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_elastic_logging()
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as exc:
        return _report_failure(exc)
    except SignalException as exc:  # Ctrl-C or a kill of the launcher: workers are stopped
        print(f"rlhf: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


def accelerate_main(args: list[str]) -> int:
    """`accelerate launch` with the same readable failures as `torchrun_main`."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_elastic_logging()
    try:
        launch_command(launch_command_parser().parse_args(args))
    except ChildFailedError as exc:  # several processes: accelerate runs torchrun's agent
        return _report_failure(exc)
    except subprocess.CalledProcessError as exc:  # one process: accelerate runs it directly
        if exc.returncode == EXIT_USER_ERROR:
            return EXIT_USER_ERROR
        print(f"rlhf: the worker failed with exit status {exc.returncode}; its traceback is above",
              file=sys.stderr)
        return 1
    except SignalException as exc:
        print(f"rlhf: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


def _quiet_elastic_logging() -> None:
    """torchrun logs every failed worker and every SIGTERM it sends to the others;
    `_report_failure` says it once. Rendezvous and agent messages stay."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _report_failure(exc) -> int:
    failures = exc.failures.values()
    if any(f.exitcode == EXIT_USER_ERROR for f in failures):
        return EXIT_USER_ERROR  # the worker wrote the message; the parent prints it
    rank, failure = exc.get_first_failure()
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()} (out of memory?)"
    else:
        how = f"failed with exit status {failure.exitcode}; its traceback is above"
    print(f"rlhf: worker rank {rank} {how}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == [ACCELERATE_FLAG]:
        sys.exit(accelerate_main(sys.argv[2:]))
    sys.exit(torchrun_main(sys.argv[1:]))
