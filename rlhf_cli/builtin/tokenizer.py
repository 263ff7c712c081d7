"""The built-in byte-level tokenizer: built in code, so the tool works offline.

Every UTF-8 byte is one token and there are no merges, so nothing has to be trained and any
text round-trips exactly. Ids follow LLaMA's layout for the specials:

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>   4..259 bytes 0x00..0xFF

Like LLaMA, encoding with `add_special_tokens=True` prepends BOS and never appends EOS.
As in every Hugging Face tokenizer, the literal strings "<s>", "</s>", "<pad>" and "<unk>"
inside a text are read as the special tokens (this is what lets callers write
`text + tokenizer.eos_token`); any other text round-trips byte for byte.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
BYTE_OFFSET = len(SPECIAL_TOKENS)  # id of byte 0x00
VOCAB_SIZE = BYTE_OFFSET + 256

MODEL_MAX_LENGTH = 2048

# ChatML-like layout. The <|im_start|>/<|im_end|> markers are plain text to this tokenizer
# (a few byte tokens each). There is no `bos_token` here on purpose: the tokenizer adds BOS
# itself when encoding with add_special_tokens=True, so a template BOS would be doubled.
# Consequence: render with apply_chat_template(..., tokenize=False) and then encode the text;
# apply_chat_template(..., tokenize=True) encodes with add_special_tokens=False (no BOS).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins the ByteLevel pre-tokenizer uses, in byte order 0..255.

    This is GPT-2's `bytes_to_unicode` table: printable Latin-1 bytes stand for themselves,
    the others are shifted to code points 256 and up.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return [table[b] for b in range(256)]


def _vocab() -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b, symbol in enumerate(_byte_symbols()):
        vocab[symbol] = BYTE_OFFSET + b
    return vocab


def _backend() -> Tokenizer:
    """The `tokenizers` pipeline: bytes in, one token per byte, BOS prepended."""
    backend = Tokenizer(models.BPE(vocab=_vocab(), merges=[], unk_token=UNK))
    # use_regex=False: with no merges, splitting into words would change nothing.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    return backend


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in tokenizer; identical on every call (nothing random, nothing downloaded)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
