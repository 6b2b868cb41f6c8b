"""The package's shape: data flows one way through the pipeline stages; the public surface holds no traps."""

from __future__ import annotations

import ast
import pathlib

import pytest

import compactor

PACKAGE = pathlib.Path(compactor.__file__).parent

# Each module may import only modules listed before it.
ORDER = [
    "errors", "tensors", "timing", "progress", "files", "shards", "kinds", "plans",  # base: no pipeline knowledge
    "layers", "probe", "masks", "graph", "heads", "experts", "hfconfig", "planner", "fold", "report", "verify",
    "fingerprint",  # the pipeline
    "api", "importance", "pruner", "saving", "pretrained", "streaming", "export", "plot",        # what users call
    "testing", "demo", "bench", "cli", "__main__",      # built on all of the above
]


def _imports(path: pathlib.Path) -> set[str]:
    """compactor modules imported anywhere in ``path`` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("compactor."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("compactor."))
    return found - {"__version__"}


def _modules() -> dict[str, list[pathlib.Path]]:
    mods: dict[str, list[pathlib.Path]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        mods.setdefault(rel.parts[0].removesuffix(".py"), []).append(path)
    return mods


def test_every_module_has_a_place_in_the_stage_order():
    """A new module must say where it sits in the pipeline."""
    assert sorted(set(_modules()) - set(ORDER)) == []


@pytest.mark.parametrize("name", [n for n in ORDER if n in _modules()])
def test_no_module_imports_a_later_stage(name):
    """masks -> graph -> planner (uses probe) -> fold -> report -> verify: never backwards."""
    later = set(ORDER[ORDER.index(name) + 1:])
    for path in _modules()[name]:
        assert sorted(_imports(path) & later) == [], f"{path.relative_to(PACKAGE)} imports a later stage"


def test_public_names_are_what_they_say():
    """`compactor.plan` stays the function after the planning module is imported; report_of is typed."""
    import compactor.planner  # noqa: F401
    import compactor.report  # noqa: F401

    assert callable(compactor.plan) and compactor.plan.__module__ == "compactor.api"
    assert compactor.report_of.__annotations__["return"] in ("Report", compactor.Report)
    assert set(compactor.__all__) <= set(dir(compactor))
