"""What a PPO iteration records besides its maths: phase timings (each phase then frees
what it allocated), the rollout's global means by name, and `samples.jsonl`."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ...engine.memory import release_freed_memory
from ...engine.reduce import global_sums
from ...engine.rollout import Rollout
from .experience import Experience, zero_std_share

SAMPLES = "samples.jsonl"


class Phases:
    """`with phases("generate"): ...` adds `time_generate` (seconds) to `phases.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        tic = time.perf_counter()
        yield
        release_freed_memory()  # each phase frees what it allocated; see engine/memory.py
        self.seconds[f"time_{name}"] = time.perf_counter() - tic


def rollout_means(rollout: Rollout, scores: torch.Tensor, experience: Experience, ppo, backend) -> dict:
    """Means over every process's responses: score (raw), KL, length, share without EOS (and, for
    grpo/rloo, `frac_reward_zero_std`: the share of prompts whose samples all got the same shaped
    score, the one the advantages see: no signal); `responses`: how many there were. With dynamic
    sampling that share comes from dynamic_sampling.py instead (over every group sampled)."""
    responses = rollout.input_ids.shape[0]
    sums = {"score": float(scores.sum()), "kl": float(experience.kl_per_response.sum()),
            "response_length": float(rollout.response_mask.sum(dim=1).sum()),
            "no_eos_share": float((~rollout.ended).sum()), "responses": float(responses)}
    if ppo.estimator.group_relative and not ppo.dynamic_sampling:
        prompts = responses // ppo.samples_per_prompt
        sums["zero_std_prompts"] = zero_std_share(experience.rewards, ppo.samples_per_prompt) * prompts
    totals = global_sums(backend, sums)
    count = totals["responses"]
    means = {k: totals[k] / max(count, 1.0) for k in ("score", "kl", "response_length", "no_eos_share")}
    if "zero_std_prompts" in totals:
        means["frac_reward_zero_std"] = totals["zero_std_prompts"] * ppo.samples_per_prompt / count
    return {**means, "responses": count}


class SampleLog:
    """A few (prompt, response, score) of every log step in `samples.jsonl` (main process)."""

    def __init__(self, run_dir: Path, enabled: bool, log_every: int):
        self.path, self.enabled, self.log_every = Path(run_dir) / SAMPLES, enabled, log_every

    def write(self, step: int, prompts, responses, scores) -> None:
        if not self.enabled or step % self.log_every:
            return
        with self.path.open("a") as handle:
            for prompt, response, score in list(zip(prompts, responses, scores, strict=True))[:4]:
                handle.write(json.dumps({"step": step, "prompt": prompt, "response": response,
                                         "score": score}) + "\n")

    def truncate_after(self, step: int) -> None:
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= step]
            self.path.write_text("".join(kept))
