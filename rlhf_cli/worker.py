"""What every training process runs: `python -m rlhf_cli.worker RUN/recipe.yaml [--resume]`.

In a single-process run the CLI calls `run_worker` directly; with several processes the
launcher starts this module once per rank.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import EXIT_USER_ERROR, UserError
from .launcher import ERROR_FILE_ENV
from .stages import STAGE_RUNNERS


def stage_runner(stage: str):
    if stage not in STAGE_RUNNERS:
        raise UserError(f"`rlhf {stage}` is not implemented yet")
    module, _, name = STAGE_RUNNERS[stage].partition(":")
    return getattr(importlib.import_module(module), name)


def _train(recipe_file: str, resume: bool) -> None:
    from .quiet import quiet_libraries

    quiet_libraries()
    from transformers import set_seed

    from .config import load_resolved
    from .engine.backends import make_backend
    from .engine.run_dir import finish_run_info, write_run_info

    recipe = load_resolved(recipe_file)
    run_dir = Path(recipe_file).parent
    runner = stage_runner(recipe.stage)
    backend = make_backend(recipe)
    # Same seed on every rank before any weight is created: identical LoRA init.
    set_seed(recipe.train.seed)
    if backend.is_main:
        write_run_info(run_dir, backend.world_size, stage=recipe.stage)
    summary = runner(recipe, run_dir, backend, resume=resume)
    backend.barrier()
    if backend.is_main:
        finish_run_info(run_dir, summary=summary or {})


def report_user_error(message: str) -> None:
    """One `error:` line however many ranks fail.

    Under `launcher.run` the message goes to the file it names and the parent prints it
    (torchrun's own exit status would say 1); a rank that finds the file already written
    leaves it. Started any other way, rank 0 prints it.
    """
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:
        try:
            with open(error_file, "x", encoding="utf-8") as handle:
                handle.write(message)
        except FileExistsError:
            pass
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr)


def run_worker(recipe_file: str, *, resume: bool, debug: bool) -> int:
    """0, 2 for a user error (bad input, or a disk that cannot take the run's files), 130
    for Ctrl-C (after the loop saved a checkpoint when it could)."""
    try:
        _train(recipe_file, resume)
    except UserError as exc:
        if debug:
            raise
        report_user_error(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Disk full or read-only while writing final/, run.json, ...: not a bug.
        from .engine.checkpoint import write_failure

        reason = write_failure(exc)
        if reason is None or debug:
            raise
        where = getattr(exc, "filename", None) or Path(recipe_file).parent
        report_user_error(f"cannot write to {where}: {reason}")
        return EXIT_USER_ERROR
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.worker")
    parser.add_argument("recipe_file")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    debug = os.environ.get("RLHF_DEBUG", "") not in ("", "0")
    code = run_worker(args.recipe_file, resume=args.resume, debug=debug)
    _shutdown_distributed()
    sys.exit(code)


def _shutdown_distributed() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
