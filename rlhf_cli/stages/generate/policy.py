"""The model `rlhf generate` samples: a run directory or a model directory.

- a LoRA run (or a bare adapter directory): its base + the adapter (peft, not merged), so a
  reward model trained on the same base can join it as one more adapter;
- a full run's `final/`, a merged model, any causal LM directory: loaded as it is.

The run's recipe.yaml, when there is one, gives the model settings (dtype, quantization,
remote code) and the data settings prompts are read with (template, lengths), as PPO reads
them for that run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...config import load_resolved
from ...engine.run_dir import FINAL, RECIPE
from ...errors import UserError
from ...models.loading import load_causal_lm, load_tokenizer, resolve_base
from ...models.policy import tokenizer_for
from ...schema import Recipe

WHERE = "--model"


def run_recipe(source: str) -> Recipe:
    """The run's resolved recipe, or the defaults for a bare model directory."""
    recipe_file = Path(source).expanduser() / RECIPE
    return load_resolved(recipe_file) if recipe_file.is_file() else Recipe()


def model_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if (path / FINAL).is_dir():
        path = path / FINAL
    if not path.is_dir():
        raise UserError(f"model not found: {source} (a run directory, or a model or adapter "
                        "directory)", where=WHERE)
    return path


def _adapter_task(directory: Path) -> str | None:
    config = directory / "adapter_config.json"
    return json.loads(config.read_text()).get("task_type") if config.is_file() else None


def load_sampling_policy(source: str) -> tuple[object, object, Recipe]:
    """(causal LM or peft model in eval mode, its tokenizer, the recipe it is read with)."""
    recipe = run_recipe(source)
    directory = model_dir(source)
    task = _adapter_task(directory)
    if task == "SEQ_CLS" or _is_classifier(directory):
        raise UserError(f"{source} is a reward model; sample from a policy (an SFT, DPO or PPO run, "
                        "or a causal LM)", where=WHERE)
    if task is not None:
        from peft import PeftModel

        has_recipe = (Path(source).expanduser() / RECIPE).is_file()
        named = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        section = replace(recipe.model, base=resolve_base(recipe.model.base) if has_recipe else named,
                          gradient_checkpointing=False)
        lm = PeftModel.from_pretrained(load_causal_lm(section), str(directory))
    else:
        if not (directory / "config.json").is_file():
            raise UserError(f"{directory} holds neither a model (config.json) nor a LoRA adapter "
                            "(adapter_config.json)", where=WHERE)
        section = replace(recipe.model, base=str(directory), tokenizer=recipe.model.tokenizer, lora=None,
                          gradient_checkpointing=False, quantization=None)
        lm = load_causal_lm(section)
    recipe = replace(recipe, model=section)
    return lm.eval(), _tokenizer(directory, recipe), recipe


def _is_classifier(directory: Path) -> bool:
    config = directory / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _tokenizer(directory: Path, recipe: Recipe):
    """The tokenizer saved with the model (runs save theirs in final/), else the recipe's."""
    if (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(str(directory), recipe.model.trust_remote_code)
    return tokenizer_for(recipe)
