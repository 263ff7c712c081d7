"""The `rlhf` command line. Importing this module must not import torch.

Each training command resolves the recipe here (cheap, no torch), prepares the output
directory, then either trains in this process or launches workers (`launcher.py`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import click
import typer

from .cli_common import (
    DebugOpt,
    DryOpt,
    OutOpt,
    OverwriteOpt,
    RecipeOpt,
    ResumeOpt,
    SetOpt,
    debug_wanted,
    fail,
    run_ignoring_ctrl_c,
)
from .cli_generate import generate as generate_command
from .errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="rlhf",
    help="SFT, reward models, DPO and PPO with LoRA adapters for Hugging Face causal LMs.\n\n"
         "Quick start (no download needed): rlhf sft --recipe recipes/tiny-sft.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)



def _train(stage: str, recipe: Path, overrides: list[str] | None, output_dir: str | None,
           dry_run: bool, resume: bool, overwrite: bool, debug: bool) -> None:
    from . import config

    debug = debug_wanted(debug)
    try:
        resolved = config.load_recipe(recipe, overrides or [], stage=stage, output_dir=output_dir)
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        if dry_run:
            from .dry_run import show_dry_run

            show_dry_run(resolved, resume=resume)
            return
        from .engine.run_dir import RECIPE, discard_untrained_run, prepare_run_dir
        from .preflight import preflight

        preflight(resolved)
        created = not Path(resolved.output_dir).exists()
        run_dir = prepare_run_dir(resolved.output_dir, resume=resume, overwrite=overwrite)
        recipe_file = run_dir / RECIPE
        if resume and recipe_file.is_file():
            _check_resumed_recipe(recipe_file, resolved)
        code = None
        try:
            code = _start(resolved, recipe_file, resume, debug)
        finally:
            if code != 0 and not resume:
                # A fresh run that stopped before training anything (bad data, say) has
                # nothing to keep; its recipe.yaml would make the corrected command fail
                # with "already holds a run".
                discard_untrained_run(run_dir, remove_dir=created)
    except UserError as exc:
        fail(exc, debug)
    if code:
        raise typer.Exit(code)


def _check_resumed_recipe(recipe_file: Path, resolved) -> None:
    """The run continues as its recipe.yaml says; a changed key would silently not apply
    (and would make the resumed run differ from an uninterrupted one)."""
    from . import config

    changed = config.changed_keys(config.load_resolved(recipe_file), resolved)
    if changed:
        raise UserError(f"--resume continues the run recorded in {recipe_file}, but "
                        f"this command changes {', '.join(changed)}: drop the changes, "
                        "or start a new run in another --output-dir")


def _start(resolved, recipe_file: Path, resume: bool, debug: bool) -> int:
    """Write the run's recipe.yaml (a fresh run's), then train here or launch the workers."""
    from . import config, launcher
    from .engine.run_dir import write_atomic

    if not resume or not recipe_file.is_file():
        try:
            write_atomic(recipe_file, config.dump_recipe(resolved))
        except OSError as exc:
            raise UserError(f"cannot write {recipe_file}: {exc.strerror}") from None
    argv = launcher.worker_argv(resolved.launch, str(recipe_file), resume=resume)
    os.environ["RLHF_COMMAND"] = shlex.join(["rlhf", *sys.argv[1:]])
    if launcher.needs_launcher(resolved.launch):
        typer.echo(f"launching: {launcher.format_argv(argv)}", err=True)
        return run_ignoring_ctrl_c(launcher.run, argv)
    from .worker import run_worker

    return run_worker(str(recipe_file), resume=resume, debug=debug)


def _stage_command(stage: str, summary: str, example: str):
    def command(recipe: RecipeOpt, set_: SetOpt = None, output_dir: OutOpt = None,
                dry_run: DryOpt = False, resume: ResumeOpt = False,
                overwrite: OverwriteOpt = False, debug: DebugOpt = False) -> None:
        _train(stage, recipe, set_, output_dir, dry_run, resume, overwrite, debug)

    command.__doc__ = f"{summary}\n\nExample:\n\n    {example}"
    return command


app.command("sft")(_stage_command(
    "sft", "Supervised fine-tuning (full or LoRA) on prompt/response or chat data.",
    "rlhf sft --recipe recipes/tiny-sft.yaml --set train.max_steps=50"))
app.command("rm")(_stage_command(
    "rm", "Train a reward model (LoRA + scalar head) on preference pairs.",
    "rlhf rm --recipe recipes/tiny-rm.yaml"))
app.command("dpo")(_stage_command(
    "dpo", "Direct preference optimisation and its family (IPO, hinge, SimPO, ORPO...).",
    "rlhf dpo --recipe recipes/tiny-dpo.yaml --set dpo.beta=0.2"))
app.command("ppo")(_stage_command(
    "ppo", "PPO with actor, critic, reference and reward on one base as LoRA adapters.",
    "rlhf ppo --recipe recipes/llama2-7b-1base-1lora.yaml"))
app.command("rft")(_stage_command(
    "rft", "Rejection-sampling fine-tuning: sample, score, keep the best, SFT; rft.rounds > 1 is RAFT.",
    "rlhf rft --recipe recipes/tiny-rft.yaml"))
app.command("rrhf")(_stage_command(
    "rrhf", "RRHF: rank K scored responses per prompt (`rlhf generate` output) + SFT on the best.",
    "rlhf rrhf --recipe recipes/tiny-rrhf.yaml --set data.train=samples.jsonl"))
app.command("generate")(generate_command)


@app.command("merge-lora")
def merge_lora(
    source: Annotated[str, typer.Argument(help="A run directory or a PEFT adapter directory.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the merged model.")],
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge a LoRA adapter into its base: a standalone model plain transformers loads.

    Example:

        rlhf merge-lora runs/tiny-sft --out runs/tiny-sft-merged
    """
    debug = debug_wanted(debug)
    try:
        from .quiet import quiet_libraries

        quiet_libraries()
        from .stages.merge_lora import merge_lora as run_merge

        run_merge(source, out, overwrite=overwrite)
    except UserError as exc:
        fail(exc, debug)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option("--model", help="A run directory or model directory "
                                       "(reward model or policy).")],
    data: Annotated[str, typer.Option("--data", help="Held-out preference data "
                                      "(file or builtin:sort:eval).")],
    reward_model: Annotated[str | None, typer.Option(
        "--reward-model", help="Judge for --generate: a reward-model run or directory.")] = None,
    reward_fn: Annotated[str | None, typer.Option(
        "--reward-fn", help="Judge for --generate: `module:function` or `file.py:function`.")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also sample answers from the policy "
                                           "and its reference and score them.")] = False,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="Reference model for a full (non-LoRA) policy.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report JSON (default RUN/eval/report.json); "
                                             ".md and .png are written beside it.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="β of the implicit reward.")] = None,
    template: Annotated[str | None, typer.Option("--template")] = None,
    max_length: Annotated[int | None, typer.Option("--max-length")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    num_prompts: Annotated[int | None, typer.Option("--num-prompts")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="0 = greedy.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Score held-out preference data with a reward model or a policy.

    Example:

        rlhf eval --model runs/tiny-rm --data builtin:sort:eval --out report.json
    """
    debug = debug_wanted(debug)
    try:
        from .quiet import quiet_libraries

        quiet_libraries()
        from .stages.evaluate import run_eval

        overrides = {"beta": beta, "template": template, "max_length": max_length,
                     "batch_size": batch_size, "num_prompts": num_prompts,
                     "max_new_tokens": max_new_tokens, "temperature": temperature}
        run_eval(model, data, out=out, reward_model=reward_model, reward_fn=reward_fn,
                 generate=generate, reference=reference, overrides=overrides)
    except UserError as exc:
        fail(exc, debug)


@app.command("preview")
def preview(
    recipe: RecipeOpt,
    set_: SetOpt = None,
    n: Annotated[int, typer.Option("--n", help="How many examples.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per example.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Show the first training examples exactly as the model will see them.

    Example:

        rlhf preview --recipe recipes/tiny-sft.yaml --n 2 --json
    """
    from . import config

    debug = debug_wanted(debug)
    try:
        resolved = config.load_recipe(recipe, set_ or [])
        from .dry_run import show_preview

        show_preview(resolved, n=n, as_json=as_json)
    except UserError as exc:
        fail(exc, debug)


# typer >= 0.2x vendors click (`typer._click`) and raises its own classes, whose common base
# is `typer.TyperException`; older typer raises click's. Catch both, or a mistyped option
# ends in a traceback instead of one `error:` line.
_CLICK_ERRORS = (click.exceptions.ClickException, getattr(typer, "TyperException", click.ClickException))
_CLICK_EXITS = (click.exceptions.Exit, typer.Exit)
_CLICK_ABORTS = (click.exceptions.Abort, typer.Abort)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: click usage errors become one `error:` line, exit 2."""
    try:
        result = app(args=argv, standalone_mode=False)
    except _CLICK_ERRORS as exc:
        message = exc.format_message()
        if type(exc).__name__ == "NoArgsIsHelpError":
            # `rlhf` alone: rich help is already on stdout (the message is then empty).
            if message.strip():
                typer.echo(message)
        else:
            typer.echo(f"error: {message}", err=True)
        return EXIT_USER_ERROR
    except _CLICK_EXITS as exc:
        return exc.exit_code
    except _CLICK_ABORTS:
        typer.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
