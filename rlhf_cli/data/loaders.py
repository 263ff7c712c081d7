"""Every stage's training data, read and tokenized as the recipe says.

One place for each kind, so that stages (and `--dry-run`, `rlhf preview`, PPO-ptx) read the
same rows the same way: SFT examples, preference pairs, KTO's unpaired examples, RRHF's ranked
responses, PPO prompts.
The `examples_*` functions build from rows already read; the `load_*` ones also read the
source and print its one-line report (`data.train: 1000 rows, 3 dropped ...`) once.
"""

from __future__ import annotations

from ..engine.progress import say
from ..errors import UserError
from ..schema import Recipe
from .preference import build_preference_dataset
from .prompt_data import build_prompt_dataset
from .ranked import build_ranked_dataset
from .sft import build_sft_dataset, loss_on_every_token
from .sources import load_source
from .unpaired import UnpairedView, build_unpaired_dataset, is_unpaired


def sft_examples(rows, recipe: Recipe, tokenizer, source: str):
    """(examples, report); the loss covers every token unless `sft.completion_only`."""
    data = recipe.data
    examples, report = build_sft_dataset(rows, tokenizer, data.template, data.max_length,
                                         data.max_prompt_length, source=source)
    if not recipe.sft.completion_only:
        examples = loss_on_every_token(examples)
    return examples, report


def pair_examples(rows, recipe: Recipe, tokenizer, source: str):
    data = recipe.data
    return build_preference_dataset(rows, tokenizer, data.template, data.max_length,
                                    data.max_prompt_length, source=source)


def unpaired_examples(rows, recipe: Recipe, tokenizer, source: str):
    data = recipe.data
    return build_unpaired_dataset(rows, tokenizer, data.template, data.max_length,
                                  data.max_prompt_length, source=source)


def ranked_examples(rows, recipe: Recipe, tokenizer, source: str):
    data = recipe.data
    return build_ranked_dataset(rows, tokenizer, data.template, data.max_length,
                                data.max_prompt_length, source=source)


def load_sft(recipe: Recipe, tokenizer, spec: str, key: str, backend):
    examples, report = sft_examples(load_source(spec, "sft", key=key), recipe, tokenizer, spec)
    say(backend, f"{key}: {report.summary()}")
    return examples


def load_pairs(recipe: Recipe, tokenizer, spec: str, key: str, backend):
    examples, report = pair_examples(load_source(spec, "preference", key=key), recipe, tokenizer, spec)
    say(backend, f"{key}: {report.summary()}")
    return examples


def load_ranked(recipe: Recipe, tokenizer, spec: str, key: str, backend):
    """RRHF's examples: K scored responses to each prompt, or preference pairs (K = 2)."""
    examples, report = ranked_examples(load_source(spec, "preference", key=key), recipe, tokenizer, spec)
    say(backend, f"{key}: {report.summary()}")
    return examples


def load_unpaired(recipe: Recipe, tokenizer, spec: str, key: str, backend):
    """Unpaired examples `{"input_ids", "labels", "label"}` from either data format."""
    rows = load_source(spec, "preference", key=key)
    if not is_unpaired(rows):
        pairs = load_pairs(recipe, tokenizer, spec, key, backend)
        say(backend, f"{key}: {len(pairs)} pairs used as {2 * len(pairs)} unpaired examples "
                     "(chosen: desirable, rejected: undesirable)")
        return UnpairedView(pairs)
    examples, report = unpaired_examples(rows, recipe, tokenizer, spec)
    say(backend, f"{key}: {report.summary()}")
    return examples


def load_prompts(recipe: Recipe, tokenizer, backend, section: str = "ppo"):
    """The prompts a sampling stage reads, cut to leave room for its `<section>.max_new_tokens`
    in `data.max_length` (`section`: the recipe section that samples: ppo, rft, or dpo online)."""
    data = recipe.data
    rows = load_source(data.train, "prompts")
    limit = data.max_prompt_length or data.max_length - getattr(recipe, section).max_new_tokens
    if limit < 1:
        raise UserError(f"data.max_length leaves no room for {section}.max_new_tokens",
                        where="data.max_length")
    prompts, report = build_prompt_dataset(rows, tokenizer, data.template, limit, source=data.train)
    say(backend, f"data.train: {report.summary()}")
    return prompts
