"""Which examples each process sees at each optimizer step.

A global batch holds `batch_size * grad_accum * world_size` examples drawn from a
per-epoch permutation seeded by (seed, epoch). Micro-batch m of rank r takes slice
`(m * world_size + r)`. The order is a pure function of the step, so resuming needs only
the step number, and 1 x 8 (batch x accumulation) sees the same 8 examples as 8 x 1.
The permutation is held as 4-byte integers (4 MB per 1M examples, not 36 MB as a list), shuffled
by the same `random.Random(...).shuffle` as ever, so the order is unchanged.
"""

from __future__ import annotations

import math
import random
from array import array

from ..errors import UserError


class GlobalBatches:
    def __init__(self, num_examples: int, batch_size: int, grad_accum: int, world_size: int,
                 rank: int, seed: int, shuffle: bool = True, *, what: str = "examples",
                 keys: str = "the batch size"):
        """`what` names the examples and `keys` the recipe keys that set the batch, for the
        error when there is less than one global batch (each stage passes its own)."""
        self.num_examples = num_examples
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * grad_accum * world_size
        self.steps_per_epoch = num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"only {num_examples} {what}, fewer than one global batch "
                            f"({self._product()}): lower {keys}")
        self._order_epoch, self._order = -1, array("q")

    def _product(self) -> str:
        accumulation = f" x {self.grad_accum} accumulation" if self.grad_accum != 1 else ""
        return (f"{self.batch_size} per process{accumulation} x {self.world_size} processes "
                f"= {self.global_batch}")

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def _epoch_order(self, epoch: int) -> array:
        if epoch != self._order_epoch:
            order = array("i" if self.num_examples < 2**31 else "q", range(self.num_examples))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches for optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = position * self.global_batch
        batch = order[start:start + self.global_batch]
        size = self.batch_size
        starts = [(m * self.world_size + self.rank) * size for m in range(self.grad_accum)]
        return [batch[start:start + size].tolist() for start in starts]
