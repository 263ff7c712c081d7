"""PPO-ptx (InstructGPT): the SFT loss on `ppo.ptx_data`, mixed into every actor update.

loss = PPO loss + ptx_coef · (token-mean cross-entropy on the batch's labelled tokens).
The rows are read and tokenized exactly as `rlhf sft` reads them (same loaders, template,
lengths and `sft.completion_only`). Update u of the run takes batch u of a per-epoch
shuffled order, cycling through the data: a pure function of u, so resume needs nothing.
"""

from __future__ import annotations

from ...data.collate import pad_batch
from ...data.loaders import load_sft
from ...engine.batching import GlobalBatches
from ...schema import Recipe

WHERE = "ppo.ptx_data"


class PtxBatches:
    def __init__(self, recipe: Recipe, tokenizer, backend):
        ppo = recipe.ppo
        self.examples = load_sft(recipe, tokenizer, ppo.ptx_data, WHERE, backend)
        self.batches = GlobalBatches(len(self.examples), ppo.ptx_batch_size or ppo.mini_batch_size, 1,
                                     backend.world_size, backend.rank, recipe.train.seed,
                                     what=f"rows in {WHERE}", keys="ppo.ptx_batch_size")
        self.pad_token_id, self.device = tokenizer.pad_token_id, backend.device

    def __call__(self, update: int) -> dict:
        """This process's SFT batch for update `update` (0-based, counted over the whole run)."""
        (indices,) = self.batches.micro_batches(update)
        batch = pad_batch([self.examples[i] for i in indices], self.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}
