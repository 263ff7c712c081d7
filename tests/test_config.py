"""Recipe schema: typing, defaults, overrides, suggestions, cross-field checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlhf_cli.config import dump_recipe, load_recipe, load_resolved, parse_override
from rlhf_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "stage: sft\ndata:\n  train: builtin:sort\n"


def test_defaults_fill_missing_keys(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.train.lr == 2e-4 and recipe.model.lora.r == 16
    assert recipe.output_dir == str(Path("runs") / "r")


def test_override_is_typed_by_schema(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.max_steps=20", "train.lr=1e-4", "dpo.beta=0.2"])
    assert recipe.train.max_steps == 20 and isinstance(recipe.train.max_steps, int)
    # YAML 1.1 reads 1e-4 as a string; the schema makes it a float
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.dpo.beta == 0.2


def test_null_clears_optional_section(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["model.lora=null"])
    assert recipe.model.lora is None


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, MINIMAL + "dpo:\n  betta: 0.1\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "unknown key `dpo.betta`" in message and "did you mean `beta`" in message
    assert f"{path}:5" in message


def test_wrong_type_names_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  batch_size: eight\n")
    with pytest.raises(UserError, match=r"r\.yaml:5: train\.batch_size.*expected int"):
        load_recipe(path)


@pytest.mark.parametrize("override, pattern", [
    ("train.lr=-1", r"train\.lr.*must be > 0"),
    ("train.batch_size=0", r"train\.batch_size.*must be >= 1"),
    ("model.dtype=fp64", r"model\.dtype.*not one of"),
    ("data.max_prompt_length=600", r"max_prompt_length.*smaller than data\.max_length"),
    ("train.eval_every=10", r"needs evaluation data"),
    ("nosuch=1", r"unknown key `nosuch`"),
    ("train=3", r"expected a mapping"),
])
def test_invalid_values(tmp_path, override, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(write(tmp_path, MINIMAL), [override])


def test_override_where_is_the_flag(tmp_path):
    with pytest.raises(UserError, match=r"--set train\.lr"):
        load_recipe(write(tmp_path, MINIMAL), ["train.lr=abc"])


def test_broken_yaml_names_line(tmp_path):
    path = write(tmp_path, "stage: sft\ndata:\n  train: [unclosed\n")
    with pytest.raises(UserError, match=r"invalid YAML"):
        load_recipe(path)


def test_recipe_for_other_stage(tmp_path):
    path = write(tmp_path, "stage: dpo\ndata:\n  train: builtin:sort\n")
    with pytest.raises(UserError, match=r"for stage `dpo`.*rlhf dpo"):
        load_recipe(path, stage="sft")


def test_missing_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_parse_override_forms():
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a=[x, y]") == ("a", ["x", "y"])
    with pytest.raises(UserError):
        parse_override("novalue")


def test_round_trip_through_dump(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.max_steps=7"])
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_recipe(recipe))
    assert load_resolved(out) == recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name DeepSpeed configs relative to the repository
    stage = yaml.safe_load(path.read_text())["stage"]
    recipe = load_recipe(path, stage=stage)
    assert recipe.stage == stage


def described_keys(section=None, prefix: str = ""):
    """(dotted key, field) for every key of the schema, nested sections included."""
    from rlhf_cli.schema import Recipe
    for spec in dataclasses.fields(section or Recipe):
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(default):
            yield from described_keys(type(default), f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", spec


BOUNDED = [(key, spec.metadata["bound"]) for key, spec in described_keys() if "bound" in spec.metadata]
CHOSEN = [(key, spec.metadata["choices"]) for key, spec in described_keys() if "choices" in spec.metadata]


@pytest.mark.parametrize("key, bound", BOUNDED, ids=[key for key, _ in BOUNDED])
def test_every_bound_beside_a_field_is_checked(tmp_path, key, bound):
    low, inclusive = bound
    path = write(tmp_path, MINIMAL + "  eval: builtin:sort\n")  # train.eval_every needs it
    below = low - 1 if inclusive else low
    with pytest.raises(UserError, match=rf"^--set {key}: must be {'>=' if inclusive else '>'} {low}, got"):
        load_recipe(path, [f"{key}={below}"])
    load_recipe(path, [f"{key}={low if inclusive else low + 1}"])  # the bound itself (or above) is fine


@pytest.mark.parametrize("key, names", CHOSEN, ids=[key for key, _ in CHOSEN])
def test_every_choice_beside_a_field_is_checked(tmp_path, key, names):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UserError, match=rf"^--set {key}: `nosuch` is not one of {', '.join(names)}$"):
        load_recipe(path, [f"{key}=nosuch"])


def test_the_schema_describes_its_keys():
    """The keys an earlier CHOICES/BOUNDS table listed, still described beside their fields."""
    # 11 choices in the old table, + model.quantization, + rft.select; rft adds 8 bounds,
    # online DPO 3 (samples_per_prompt, max_new_tokens, temperature), PPO-max 7
    # (ppo.advantage_clip, entropy_coef, dual_clip, critic_lr, critic_adam_*), DAPO / Dr. GRPO
    # 4 bounded (clip_range_low/high, max_sampling_rounds, overlong_buffer) and 3 chosen
    # (loss_aggregation, scale_rewards, overlong); rrhf 2 (length_penalty, rank_weight)
    assert len(BOUNDED) == 37 + 8 + 3 + 7 + 4 + 2 and len(CHOSEN) == 12 + 1 + 3
    assert dict(CHOSEN)["ppo.advantage"] == ("gae", "grpo", "rloo", "reinforce_pp")
    assert dict(CHOSEN)["model.quantization"] == ("4bit", "8bit")
    paths = sorted(key for key, spec in described_keys() if spec.metadata.get("names") == "path")
    assert paths == ["data.eval", "data.train", "dpo.reward_model", "launch.deepspeed", "model.base",
                     "model.tokenizer", "ppo.ptx_data", "ppo.reward_model", "rft.reward_model"]
