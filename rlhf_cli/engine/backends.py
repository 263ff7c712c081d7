"""Which backend runs a recipe: DeepSpeed when `launch.deepspeed` names a config, else accelerate.

Its own module so that backend.py (the interface and the accelerate one) and
deepspeed_backend.py (which subclasses it) do not import each other.
"""

from __future__ import annotations

from ..schema import Recipe
from .backend import AccelerateBackend, Backend
from .deepspeed_backend import DeepSpeedBackend


def make_backend(recipe: Recipe) -> Backend:
    if recipe.launch.deepspeed:
        return DeepSpeedBackend(recipe)
    return AccelerateBackend(recipe)
