"""`rlhf generate`: K samples per prompt from a policy, scored by a judge, one JSON row per prompt.

The command checks its settings, prepares `OUT.parts/` (stages/generate/shards.py), then
samples here (one process) or launches ranks (`--num-processes`, through the same launcher
as training), and finally merges the ranks' rows into OUT in prompt order. Each rank runs
`python -m rlhf_cli.cli_generate OUT.parts/settings.json` (`rank_main` below).
Importing this module must not import torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import DebugOpt, debug_wanted, fail, run_ignoring_ctrl_c
from .errors import EXIT_USER_ERROR, UserError
from .stages.generate.settings import GenerateSettings

INTERRUPTED = 130
# Launch keys that mean something only for training, and why `rlhf generate` refuses them.
TRAINING_ONLY = {
    "launch.deepspeed": "rlhf generate only samples: each rank holds the whole model, and "
                        "DeepSpeed's sharding is for training state",
    "launch.mixed_precision": "rlhf generate samples in the model's own dtype (the run's "
                              "model.dtype); mixed precision is a training setting",
}

NumProcessesOpt = Annotated[int | None, typer.Option(
    "--num-processes", help="Ranks (torchrun); each samples its share. Shorthand for "
    "--set launch.num_processes=N.")]
LaunchSetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="A launch key, as in a recipe: `--set launch.num_machines=2` (repeatable; "
    "launcher, num_processes, num_machines, machine_rank, main_process_ip, main_process_port, cpu).")]


def generate(
    model: Annotated[str, typer.Option("--model", help="A run directory (LoRA: base + adapter) or a "
                                       "model directory.")],
    data: Annotated[str, typer.Option("--data", help="Prompts, read as PPO reads them "
                                      "(file or builtin:sort).")],
    out: Annotated[Path, typer.Option("--out", help="JSON Lines to write: one row per prompt.")],
    n: Annotated[int, typer.Option("--n", help="Responses per prompt.")] = 4,
    reward_model: Annotated[str | None, typer.Option(
        "--reward-model", help="Judge: a reward-model run or directory.")] = None,
    reward_fn: Annotated[str | None, typer.Option(
        "--reward-fn", help="Judge: `module:function` or `file.py:function`.")] = None,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.")] = 0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    template: Annotated[str | None, typer.Option(
        "--template", help="Chat template (default: the run's data.template, else plain).")] = None,
    max_prompt_length: Annotated[int | None, typer.Option(
        "--max-prompt-length", help="Longer prompts are skipped (default: the run's, else "
        "data.max_length - max_new_tokens).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    num_processes: NumProcessesOpt = None,
    sets: LaunchSetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into "
                                         "the same --out.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Sample K responses per prompt (and score them with a judge) into a JSON Lines file.

    Example:

        rlhf generate --model runs/tiny-sft --data builtin:sort --n 4
        --reward-fn rlhf_cli.builtin.tasks:sort_reward --out samples.jsonl
    """
    debug = debug_wanted(debug)
    settings = GenerateSettings(
        model=model, data=data, out=str(out), n=n, reward_model=reward_model, reward_fn=reward_fn,
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        template=template, max_prompt_length=max_prompt_length, batch_size=batch_size, seed=seed)
    code = 0
    try:
        launch = generate_launch(sets or [], num_processes)
        code = run_generate(settings, resume=resume, launch=launch, debug=debug)
    except UserError as exc:
        fail(exc, debug)
    if code:
        raise typer.Exit(code)


def generate_launch(sets: list[str], num_processes: int | None):
    """The launch section from `--set launch.KEY=VALUE` and `--num-processes`, checked as a
    recipe's launch keys are; keys that only mean something for training are refused."""
    from .config import build_section, parse_override
    from .schema import LaunchSection

    for text in sets:
        key = parse_override(text)[0]
        if key in TRAINING_ONLY:
            raise UserError(TRAINING_ONLY[key], where=f"--set {key}")
    if num_processes is not None:
        given = [parse_override(t)[1] for t in sets if parse_override(t)[0] == "launch.num_processes"]
        if any(value != num_processes for value in given):
            raise UserError(f"{num_processes} disagrees with --set launch.num_processes={given[-1]}: "
                            "give one", where="--num-processes")
        if num_processes < 1:
            raise UserError(f"must be at least 1, got {num_processes}", where="--num-processes")
        sets = [*sets, f"launch.num_processes={num_processes}"]
    return build_section(LaunchSection, sets, "launch")


def run_generate(settings: GenerateSettings, *, resume: bool, launch, debug: bool) -> int:
    """0 once OUT holds every prompt's row; 130 when interrupted (rows so far are kept)."""
    from .stages.generate import shards

    settings.check()
    fresh = not shards.parts_dir(settings.out).is_dir()
    if not shards.start(settings, resume):
        typer.echo(f"{settings.out} is complete: nothing to do", err=True)
        return 0
    try:
        code = _run_ranks(settings, launch, debug)
    except UserError:
        if fresh:  # bad input: a fresh run leaves nothing behind
            shards.discard(settings)
        raise
    if code == EXIT_USER_ERROR and fresh:
        shards.discard(settings)
    if code == INTERRUPTED:
        typer.echo(f"interrupted: rows so far are in {shards.parts_dir(settings.out)}; continue "
                   "with the same command and --resume", err=True)
    if code == 0:
        rows = shards.merge(settings)
        typer.echo(f"wrote {rows} rows to {settings.out}", err=True)
    return code


def _run_ranks(settings: GenerateSettings, launch, debug: bool) -> int:
    from . import launcher

    if launch.cpu:  # before torch is imported, here and in the launched ranks (they inherit it)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not launcher.needs_launcher(launch):
        from .quiet import quiet_libraries

        quiet_libraries()
        from .stages.generate.run import generate_share

        try:
            generate_share(settings)
        except KeyboardInterrupt:
            return INTERRUPTED
        return 0
    from .stages.generate.shards import SETTINGS, parts_dir

    argv = launcher.worker_argv(launch, str(parts_dir(settings.out) / SETTINGS), resume=False,
                                module=__name__)
    typer.echo(f"launching: {launcher.format_argv(argv)}", err=True)
    return run_ignoring_ctrl_c(launcher.run, argv)


def rank_main(settings_file: str) -> int:
    """One launched rank: its share of the prompts; 2 on a user error (reported once)."""
    from .quiet import quiet_libraries
    from .worker import report_user_error

    quiet_libraries()
    from .stages.generate.run import generate_share

    try:
        generate_share(GenerateSettings.read(Path(settings_file)), int(os.environ.get("RANK", "0")),
                       int(os.environ.get("WORLD_SIZE", "1")))
    except UserError as exc:
        if debug_wanted(False):
            raise
        report_user_error(str(exc))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))
