"""Helpers for the tests that launch the real CLI on several CPU processes: the ZeRO-3 preset
with every weight sharded (and a copy with its own leaf modules), and probes (a sitecustomize
on PYTHONPATH) that patch named modules right after they are imported, in every launched
process."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cli_helpers import REPO

# Appended to a probe's source, which defines PATCHES = {module name: function(module)}; the
# probe is active only where RLHF_PROBE_LOG is set (the test's launched processes).
PATCH_AFTER_IMPORT = '''

import importlib.abc, importlib.util, os, sys


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def run(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = run
        return spec


if os.environ.get("RLHF_PROBE_LOG"):
    sys.meta_path.insert(0, _PatchAfterImport())
'''


def write_probe(directory: Path, patches: str) -> Path:
    """`directory/sitecustomize.py`: the probe `patches` (its PATCHES table) applied after import."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(patches + PATCH_AFTER_IMPORT)
    return directory


def probe_env(directory: Path, log: Path, *pythonpath: str) -> dict[str, str]:
    """The environment that loads the probe in `directory` and logs to `log`.rankN."""
    return {"PYTHONPATH": os.pathsep.join([str(directory), *pythonpath]), "RLHF_PROBE_LOG": str(log)}


def zero3_every_weight_sharded(directory: Path) -> Path:
    """The ZeRO-3 preset with a persistence threshold of 0: the preset's 1e5 elements exceed
    every weight of the tiny model, which would then stay whole on every rank."""
    config = json.loads((REPO / "recipes" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / "zero3-sharded.json"
    path.write_text(json.dumps(config))
    return path


def with_own_leaf_module(config: Path, classes: list[str]) -> Path:
    """A copy of the DeepSpeed JSON `config` that sets zero_optimization.leaf_module itself."""
    values = json.loads(config.read_text())
    values["zero_optimization"]["leaf_module"] = {"classes": classes}
    path = config.with_name(f"leaf-{config.name}")
    path.write_text(json.dumps(values))
    return path
