"""Built-in LLaMA-architecture models, initialised deterministically and saved locally.

`builtin:tiny` trains in seconds on a laptop CPU (demo and tests); `builtin:small` (~20M) and
`builtin:base` (~100M) use a 32000-entry vocabulary like LLaMA's so that benchmarks see
realistic embedding and LM-head sizes. Ids the byte tokenizer never produces (260 and up)
are simply unused; decoding ignores them if a model ever samples one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from rlhf_cli.builtin.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer
from rlhf_cli.errors import UserError
from rlhf_cli.models.zero3 import outside_zero3_init

PREFIX = "builtin:"
VERSION = "v1"  # bump when sizes, init or tokenizer change, so stale caches are not reused
SAFETENSORS_NAME = "model.safetensors"
MARKER = ".complete"  # written last: its presence means the directory is whole
SEED = 1234

_SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    **_SPECIAL_IDS,
}

SIZES: dict[str, dict] = {
    # ~0.8M params; vocab is the byte tokenizer's 260 rounded up to a multiple of 8.
    "tiny": {
        "vocab_size": -(-VOCAB_SIZE // 8) * 8,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **_COMMON,
    },
    # ~19.5M params, two thirds of them in the untied embedding and LM head.
    "small": {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 1024,
        **_COMMON,
    },
    # ~106M params.
    "base": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "max_position_embeddings": 1024,
        **_COMMON,
    },
    # ~374M params: how memory scales once the weights outweigh the libraries (benchmarks).
    "large": {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 1024,
        **_COMMON,
    },
}


def _check_size(size: str) -> None:
    if size not in SIZES:
        valid = ", ".join(PREFIX + s for s in SIZES)
        raise UserError(f"unknown built-in model {PREFIX + size!r}; valid: {valid}")


def build_config(size: str) -> LlamaConfig:
    _check_size(size)
    return LlamaConfig(**SIZES[size])


def build_generation_config() -> GenerationConfig:
    return GenerationConfig(**_SPECIAL_IDS)


def build_model(size: str) -> LlamaForCausalLM:
    """A freshly initialised model; the same weights on every call, in float32.

    The seed is applied inside `fork_rng`, so the caller's CPU RNG state is left exactly as
    it was. Only the CPU generator is seeded (not `torch.manual_seed`, which would also
    reseed CUDA generators that fork_rng(devices=[]) does not restore): init runs on CPU.
    """
    config = build_config(size)
    with torch.random.fork_rng(devices=[]), outside_zero3_init():
        torch.random.default_generator.manual_seed(SEED)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _widen_lm_head(model)
    model.generation_config = build_generation_config()
    return model


def _widen_lm_head(model: LlamaForCausalLM) -> None:
    """Re-draw the LM head with std 1/sqrt(hidden) instead of 0.02.

    LoRA leaves the final RMSNorm and the LM head frozen, so the hidden state entering the
    head has a fixed norm and the largest reachable logit is about std * hidden. At 0.02
    that is ~2.6 for `tiny`: the softmax can never get confident (LoRA SFT on the sort task
    plateaus near loss 3 while full fine-tuning reaches 0.001). At 1/sqrt(hidden) the
    initial logits have std ~1 and LoRA SFT reaches loss ~0.01.
    """
    std = model.config.hidden_size**-0.5
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, std)


def count_params(size: str) -> int:
    """Parameter count of a size, without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(build_config(size))
    return sum(p.numel() for p in model.parameters())


def default_root() -> Path:
    home = os.environ.get("RLHF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "rlhf"
    return base / "builtin"


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and _no_empty_weight(path / SAFETENSORS_NAME)


def _no_empty_weight(weights: Path) -> bool:
    """No tensor in the file is empty. A cache that an earlier version wrote under ZeRO-3 holds
    empty partitions (`models/zero3.py: outside_zero3_init`) behind its marker: rebuilt, not loaded.
    Reads the safetensors header only (8-byte length, then JSON)."""
    try:
        with weights.open("rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    except (OSError, ValueError):
        return False
    shapes = [entry["shape"] for key, entry in header.items() if key != "__metadata__"]
    return bool(shapes) and all(math.prod(shape) > 0 for shape in shapes)


def _write(size: str, path: Path) -> None:
    """Save config, generation config, weights and tokenizer, then the marker (last).

    Not `model.save_pretrained`: once torch.distributed is initialised it writes weights on
    rank 0 only, and other ranks calling `materialize` would publish a directory without them.
    """
    model = build_model(size)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / SAFETENSORS_NAME), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(path)
    (path / MARKER).write_text(f"{PREFIX}{size} {VERSION}\n")


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def materialize(name: str, root: Path | None = None) -> Path:
    """The directory holding built-in model `name`, writing it first if needed.

    Safe to call from several processes at once (e.g. every rank of a distributed run):
    each builds in its own temporary directory beside the target and renames it into place;
    a rename that finds the target already complete means another process won, and its
    result is used. The directory loads with plain `from_pretrained`, fully offline.
    """
    _check_size(name)
    root = Path(root) if root is not None else default_root()
    dest = root / f"{name}-{VERSION}"
    if _is_complete(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should be readable
    try:
        _write(name, tmp)
        _move_into_place(tmp, dest)
    finally:
        _discard(tmp)  # no-op once renamed; cleans up after a lost race or a failure
    return dest


def _move_into_place(tmp: Path, dest: Path) -> None:
    try:
        os.replace(tmp, dest)  # atomic; fails if dest is a non-empty directory
        return
    except OSError:
        if _is_complete(dest):
            return  # a concurrent process finished first: same content, keep theirs
    # dest is an incomplete leftover (e.g. marker deleted by hand): set it aside, retry once.
    if _is_complete(dest):
        return  # completed by another process since the check above
    stale = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
    try:
        os.replace(dest, stale / dest.name)
    except FileNotFoundError:
        pass  # someone else removed it meanwhile
    _discard(stale)
    try:
        os.replace(tmp, dest)
    except OSError:
        if not _is_complete(dest):
            raise


# Storage dtypes a built-in base can be materialised in besides float32, by `model.dtype`.
_CAST_SUFFIX = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def builtin_name(directory: str | Path) -> str | None:
    """The size a materialised built-in directory holds (`large`), None for any other path."""
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return None
    spec = marker.read_text().split()[0]
    return spec[len(PREFIX):] if spec.startswith(PREFIX) else None


def weights_for_dtype(directory: str | Path, dtype: torch.dtype) -> Path:
    """Where to read a built-in base's weights for a run in `dtype`: a copy stored in bf16/fp16.

    The canonical copy is float32. `from_pretrained(..., dtype=bf16)` on it maps the whole
    float32 file and casts every tensor into fresh memory: 1.4 GiB of file pages plus 0.7 GiB
    of copies at once for `builtin:large`, a loading peak larger than training's. A copy stored
    in the run's dtype holds the same values (the same round-to-nearest cast, done once when it
    is written), loads without a copy, and is what a user's bf16 checkpoint looks like. Any
    other directory (and float32) is returned as it is.
    """
    name = builtin_name(directory)
    if name is None or dtype not in _CAST_SUFFIX:
        return Path(directory)
    root = Path(directory).parent
    dest = root / f"{name}-{VERSION}-{_CAST_SUFFIX[dtype]}"
    if _is_complete(dest):
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=root))
    tmp.chmod(0o755)
    try:
        _write_cast(Path(directory), tmp, dtype, name)
        _move_into_place(tmp, dest)
    finally:
        _discard(tmp)
    return dest


def _write_cast(source: Path, dest: Path, dtype: torch.dtype, name: str) -> None:
    """Everything of `source`, with its weights cast to `dtype`; the marker last."""
    from safetensors import safe_open

    for item in source.iterdir():
        if item.is_file() and item.name not in (SAFETENSORS_NAME, MARKER):
            shutil.copy2(item, dest / item.name)
    with safe_open(str(source / SAFETENSORS_NAME), framework="pt") as weights:
        state = {key: weights.get_tensor(key).to(dtype).contiguous() for key in weights.keys()}
    save_file(state, str(dest / SAFETENSORS_NAME), metadata={"format": "pt"})
    (dest / MARKER).write_text(f"{PREFIX}{name} {VERSION}\n")


def resolve_builtin(spec: str) -> Path | None:
    """`builtin:<size>` -> materialized model directory; None for any other model spec."""
    if not spec.startswith(PREFIX):
        return None
    return materialize(spec[len(PREFIX) :])
