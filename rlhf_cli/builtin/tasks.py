"""Built-in tasks with checkable answers, so every stage can be run and scored offline.

"sort": the prompt holds 3 to 7 distinct letters from a..l, the answer is them in order:

    prompt   "sort dbca ="
    response " abcd"

Short on purpose (at most 22 characters; a rejected answer at most 3 more): the built-in
tokenizer is byte-level, so this is at most ~24 tokens with BOS/EOS, which a tiny model can
learn on a CPU in minutes.

Data specs: `builtin:sort` (train split), `builtin:sort:eval`, `builtin:sort:<split>:<n>`.
Train and eval never share a prompt: a fixed hash assigns every possible prompt to one
split, whatever n is asked for. Rows are identical on every call (seeded `random.Random`).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_cli.errors import UserError

PREFIX = "builtin:"
LETTERS = "abcdefghijkl"
MIN_LEN, MAX_LEN = 3, 7
KINDS = ("sft", "preference", "prompts")
SPLITS = ("train", "eval")
DEFAULT_N = {
    ("sft", "train"): 4000,
    ("preference", "train"): 4000,
    ("prompts", "train"): 2000,
    ("sft", "eval"): 200,
    ("preference", "eval"): 200,
    ("prompts", "eval"): 200,
}
# Train seeds differ per kind (more distinct prompts across stages); the eval seed is shared,
# so every stage is evaluated on the same prompts and their scores compare directly.
_SEEDS = {
    ("sft", "train"): 101,
    ("preference", "train"): 202,
    ("prompts", "train"): 303,
    ("sft", "eval"): 909,
    ("preference", "eval"): 909,
    ("prompts", "eval"): 909,
}
_EVAL_BUCKETS = 10  # one in ten possible prompts belongs to eval
# Far below the ~0.48M eval / ~4.3M train distinct prompts, so sampling stays quick.
MAX_N = 100_000
_PROMPT_RE = re.compile(r"sort\s+([a-z]*)\s*=")

RewardFn = Callable[[list[str], list[str]], list[float]]


def sort_prompt(letters: str) -> str:
    return f"sort {letters} ="


def sort_answer(letters: str) -> str:
    """The response text for the letters (leading space included)."""
    return " " + "".join(sorted(letters))


def _split_of(letters: str) -> str:
    """Stable train/eval assignment of a prompt (crc32, unlike hash(), is not salted)."""
    return "eval" if zlib.crc32(letters.encode()) % _EVAL_BUCKETS == 0 else "train"


def _sample_letters(rng: random.Random) -> str:
    return "".join(rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN)))


def _letter_sets(split: str, n: int, rng: random.Random) -> list[str]:
    """n distinct letter strings belonging to `split`."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        letters = _sample_letters(rng)
        if letters not in seen and _split_of(letters) == split:
            seen.add(letters)
            out.append(letters)
    return out


# Plausible mistakes, each a function of (letters, correct answer without space, rng). They
# cover the ways an answer can be wrong: wrong order (locally, or all of it), missing letters
# (anywhere, or the tail cut off), extra letters (a duplicate, a letter the prompt does not
# have, trailing letters after the answer), wrong letters (in or out of order), and the
# prompt echoed. A reward model trained without one of these kinds has no reason to rank it
# below the answer, and PPO finds such holes: with only the first five kinds below (swap,
# replace, drop one, duplicate, echo), an RM on a 30-step SFT model preferred a sorted answer
# with a letter the prompt lacks to the exact one on 62% of held-out prompts, and PPO
# against it learned to answer "sort dbgf =" with " bdgjl" (task score 0.45 -> 0.33).
def _swap_adjacent(letters: str, answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer) - 1)
    return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]


def _shuffle(letters: str, answer: str, rng: random.Random) -> str:
    shuffled = list(answer)
    rng.shuffle(shuffled)
    return "".join(shuffled)  # may equal the answer: _wrong_answer then draws again


def _replace_one(letters: str, answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    other = rng.choice([c for c in LETTERS if c != answer[i]])
    return answer[:i] + other + answer[i + 1 :]


def _drop_one(letters: str, answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    return answer[:i] + answer[i + 1 :]


def _drop_tail(letters: str, answer: str, rng: random.Random) -> str:
    return answer[: -rng.randint(1, 2)]


def _duplicate_one(letters: str, answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    return answer[: i + 1] + answer[i:]


def _substitute_sorted(letters: str, answer: str, rng: random.Random) -> str:
    """Still in order, but one or two letters replaced by letters the prompt does not have."""
    foreign = [c for c in LETTERS if c not in answer]
    chosen = list(answer)
    for i in rng.sample(range(len(answer)), rng.randint(1, 2)):
        chosen[i] = rng.choice(foreign)
    return "".join(sorted(chosen))


def _insert_foreign(letters: str, answer: str, rng: random.Random) -> str:
    """Still in order, but with a letter the prompt does not have."""
    return "".join(sorted(answer + rng.choice([c for c in LETTERS if c not in answer])))


def _extra_trailing(letters: str, answer: str, rng: random.Random) -> str:
    return answer + "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))


def _echo_input(letters: str, answer: str, rng: random.Random) -> str:
    return letters


MISTAKES = {
    "swap_adjacent": _swap_adjacent,
    "shuffle": _shuffle,
    "replace_one": _replace_one,
    "drop_one": _drop_one,
    "drop_tail": _drop_tail,
    "duplicate_one": _duplicate_one,
    "substitute_sorted": _substitute_sorted,
    "insert_foreign": _insert_foreign,
    "extra_trailing": _extra_trailing,
    "echo_input": _echo_input,
}
_MISTAKES = tuple(MISTAKES.values())


def _wrong_answer(letters: str, rng: random.Random) -> str:
    """A response that differs from the correct one (an echo or a shuffle can coincide with
    it: then draw again)."""
    answer = sort_answer(letters)[1:]
    while True:
        wrong = rng.choice(_MISTAKES)(letters, answer, rng)
        if wrong != answer:
            return " " + wrong


def _check(kind: str, split: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r}; valid: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def sort_rows(kind: str, split: str, n: int | None = None) -> list[dict]:
    """Rows of the sort task: sft {prompt, response}, preference {prompt, chosen, rejected},
    prompts {prompt}. Deterministic for a given (kind, split, n); a smaller n is a prefix."""
    _check(kind, split)
    n = DEFAULT_N[(kind, split)] if n is None else n
    if not 0 <= n <= MAX_N:
        raise UserError(f"row count {n} out of range for the sort task (0..{MAX_N})")
    rng = random.Random(_SEEDS[(kind, split)])
    letter_sets = _letter_sets(split, n, rng)
    if kind == "sft":
        return [{"prompt": sort_prompt(s), "response": sort_answer(s)} for s in letter_sets]
    if kind == "prompts":
        return [{"prompt": sort_prompt(s)} for s in letter_sets]
    # Separate stream for mistakes, so the prompts match what the same seed gives elsewhere.
    mistakes = random.Random(_SEEDS[(kind, split)] + 1)
    return [
        {
            "prompt": sort_prompt(s),
            "chosen": sort_answer(s),
            "rejected": _wrong_answer(s, mistakes),
        }
        for s in letter_sets
    ]


def _target(prompt: str) -> str | None:
    match = _PROMPT_RE.search(prompt)
    return "".join(sorted(match.group(1))) if match else None


def _score(prompt: str, response: str) -> float:
    target = _target(prompt)
    if target is None:
        return 0.0
    got = response.strip()
    longest = max(len(target), len(got))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(got, target, strict=False)) / longest


def sort_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Partial credit in [0, 1]: letters in the right position over the longer length.

    Exactly 1.0 only for the exact answer; surrounding whitespace is ignored; extra or
    missing characters cost credit. A prompt that is not a sort prompt scores 0.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def sort_exact(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for the exact answer (whitespace around it ignored), else 0.0."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [float(_target(p) == r.strip()) for p, r in zip(prompts, responses, strict=True)]


@dataclass(frozen=True)
class Task:
    name: str
    rows: Callable[[str, str, int | None], list[dict]]
    reward: RewardFn
    exact: RewardFn
    reward_path: str  # import string for recipes: "module:function"


TASKS: dict[str, Task] = {
    "sort": Task(
        name="sort",
        rows=sort_rows,
        reward=sort_reward,
        exact=sort_exact,
        reward_path="rlhf_cli.builtin.tasks:sort_reward",
    ),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        valid = ", ".join(PREFIX + t for t in TASKS)
        raise UserError(f"unknown built-in task {PREFIX + name!r}; valid: {valid}")
    return TASKS[name]


def parse_data_spec(spec: str) -> tuple[Task, str, int | None]:
    """`builtin:<task>[:<split>[:<n>]]` -> (task, split, n or None for the default)."""
    if not spec.startswith(PREFIX):
        raise UserError(f"not a built-in data spec: {spec!r} (expected {PREFIX}<task>)")
    parts = spec[len(PREFIX) :].split(":")
    if len(parts) > 3:
        raise UserError(f"bad built-in data spec {spec!r}; use {PREFIX}<task>[:<split>[:<n>]]")
    task = _task(parts[0])
    split = parts[1] if len(parts) > 1 else "train"
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} in {spec!r}; valid: {', '.join(SPLITS)}")
    n = None
    if len(parts) == 3:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise UserError(f"bad row count {parts[2]!r} in {spec!r}; expected a positive integer")
        n = int(parts[2])
    return task, split, n


def builtin_rows(spec: str, kind: str) -> list[dict]:
    """Rows for a data spec such as `builtin:sort` or `builtin:sort:eval`."""
    task, split, n = parse_data_spec(spec)
    return task.rows(kind, split, n)


def builtin_reward_fn(task: str) -> RewardFn:
    """The reward function of a built-in task, by name (`sort` or `builtin:sort`)."""
    name = task[len(PREFIX) :] if task.startswith(PREFIX) else task
    return _task(name.split(":")[0]).reward
