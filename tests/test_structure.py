"""The package's shape, read from its source (nothing is imported): the import graph has no
circle, no stage imports another stage, and modules and functions stay small.

Which imports count: every `import` / `from ... import` statement anywhere in a module, at
module level or inside a function, method or class. A function-level import is deferred
(to keep `rlhf --help` free of torch, say), not absent: the module still needs the other
one to run, and a circle closed by a deferred import still ties the two modules together.
Imports inside `if TYPE_CHECKING:` would count too (there are none). Dynamic imports by
string (`importlib.import_module`, the worker's stage table) are not seen.

What a stage is: a direct child of `rlhf_cli/stages/`, a module (`stages/sft.py`) or a
package (`stages/ppo/`, `stages/dpo/`). Every module inside a stage package belongs to that
stage and may import its siblings; `rlhf_cli/stages/__init__.py` belongs to no stage. So
helpers shared by several stages cannot live in `stages/` at all: they belong in
`engine/`, `models/`, `data/` or `algorithms/`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhf_cli"
ROOT = PACKAGE.name
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 50



def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules that one import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:  # relative: from the module's package, up level - 1 more
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = set()
    for alias in node.names:
        submodule = f"{target}.{alias.name}"  # `from .data import preview` names a module
        if submodule in known:
            found.add(submodule)
        elif target in known:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):  # every level: module, function, class
            edges |= imported_modules(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def stage_of(module: str) -> str | None:
    """`ppo` for rlhf_cli.stages.ppo.run, `sft` for rlhf_cli.stages.sft, else None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def cross_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} -> {other}" for module, others in graph.items() for other in others
                  if stage_of(module) and stage_of(other) and stage_of(module) != stage_of(other))


def long_modules() -> dict[str, int]:
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
               for path in PACKAGE.rglob("*.py")}
    return {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}


def long_functions() -> dict[str, int]:
    """Functions and methods (nested ones too), from `def` to their last line."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(PACKAGE)}:{node.name}"] = length
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    # cli.py imports these only inside functions; dry_run.py as `from . import config`.
    assert {f"{ROOT}.worker", f"{ROOT}.dry_run", f"{ROOT}.config"} <= graph[f"{ROOT}.cli"]
    assert f"{ROOT}.config" in graph[f"{ROOT}.dry_run"]
    assert f"{ROOT}.data.preview" in graph[f"{ROOT}.dry_run"]  # `from .data import preview`
    assert f"{ROOT}.algorithms.ppo" in graph[f"{ROOT}.stages.ppo.experience"]  # `from ...algorithms`


def test_the_checks_find_what_they_look_for():
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(circle) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
    crossing = {f"{ROOT}.stages.dpo": {f"{ROOT}.stages.rm", f"{ROOT}.data.loaders"},
                f"{ROOT}.stages.ppo.run": {f"{ROOT}.stages.ppo.ptx"}}
    assert cross_stage_imports(crossing) == [f"{ROOT}.stages.dpo -> {ROOT}.stages.rm"]
    layered = {f"{ROOT}.engine.loop": {f"{ROOT}.stages.sft", f"{ROOT}.data.collate"},
               f"{ROOT}.stages.sft": {f"{ROOT}.cli", f"{ROOT}.models.policy", f"{ROOT}.schema"}}
    assert layering_breaks(layered) == [f"{ROOT}.engine.loop -> {ROOT}.stages.sft",
                                        f"{ROOT}.stages.sft -> {ROOT}.cli"]


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert circles == []


def test_no_stage_imports_another_stage():
    assert cross_stage_imports(import_graph()) == []


# What a stage is built on: the four layers, and the recipe, its errors and the reward
# functions it names. The layers never reach up into a stage.
LAYERS = {"algorithms", "data", "engine", "models"}
BELOW_STAGES = LAYERS | {"config", "schema", "errors", "rewards"}


def layering_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Layer modules importing a stage, and stage modules importing anything but what's below."""
    def top(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    return sorted(f"{m} -> {o}" for m, others in graph.items() for o in others
                  if (top(m) in LAYERS and stage_of(o))
                  or (stage_of(m) and not stage_of(o) and top(o) not in BELOW_STAGES))


def test_stages_stand_on_the_layers_and_no_layer_imports_a_stage():
    assert layering_breaks(import_graph()) == []


def test_no_module_over_300_lines():
    found = long_modules()
    assert found == {}


def test_no_function_over_50_lines():
    found = long_functions()
    assert found == {}
