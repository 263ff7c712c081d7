"""PPO-ptx (InstructGPT): the SFT loss on `ppo.ptx_data`, mixed into every actor update.

loss = PPO loss + ptx_coef · (token-mean cross-entropy on the batch's labelled tokens).
The rows are read and tokenized exactly as `rlhf sft` reads them (same loaders, template,
lengths and `sft.completion_only`). Update u of the run takes batch u of a per-epoch
shuffled order, cycling through the data: a pure function of u, so resume needs nothing.
"""

from __future__ import annotations

from ...data.collate import pad_batch
from ...data.sft import build_sft_dataset, loss_on_every_token
from ...data.sources import load_source
from ...engine.batching import GlobalBatches
from ...schema import Recipe
from ..common import say

WHERE = "ppo.ptx_data"


class PtxBatches:
    def __init__(self, recipe: Recipe, tokenizer, backend):
        ppo, data = recipe.ppo, recipe.data
        rows = load_source(ppo.ptx_data, "sft", key=WHERE)
        examples, report = build_sft_dataset(rows, tokenizer, data.template, data.max_length,
                                             data.max_prompt_length, source=ppo.ptx_data)
        say(backend, f"{WHERE}: {report.summary()}")
        self.examples = examples if recipe.sft.completion_only else loss_on_every_token(examples)
        self.batches = GlobalBatches(len(self.examples), ppo.ptx_batch_size or ppo.mini_batch_size, 1,
                                     backend.world_size, backend.rank, recipe.train.seed)
        self.pad_token_id, self.device = tokenizer.pad_token_id, backend.device

    def __call__(self, update: int) -> dict:
        """This process's SFT batch for update `update` (0-based, counted over the whole run)."""
        (indices,) = self.batches.micro_batches(update)
        batch = pad_batch([self.examples[i] for i in indices], self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}
