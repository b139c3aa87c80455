"""The shape README.rst's "Architecture" section describes, checked on the source.

The data path reads one way (nothing below the bus imports it), metrics has no import
cycle with the bus, and no core module reads another object's private attributes: the
one deliberate exception, pymongo's cached resume token and buffer, goes through
``watcher.pymongo_peek()`` (by name, in ``operator.attrgetter``), tested in test_bus.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mongo_events"
#: The modules of the data path, below the bus.
BELOW_THE_BUS = [
    "consumer",
    "window",
    "checkpointing",
    "watcher",
    "dispatch",
    "deadlettering",
    "flusher",
    "tracking",
    "health",
    "metrics",
    "lifecycle",
    "run",
    "bus_options",
    "groups/runtime",
]


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", BELOW_THE_BUS)
def test_nothing_below_the_bus_imports_it(module: str) -> None:
    imported = _imports(_tree(module))
    assert not imported & {".bus", "mongo_events.bus"}, (
        f"{module}.py imports bus.py: the data path must not call back up"
    )


@pytest.mark.parametrize("module", ["bus", *BELOW_THE_BUS])
def test_no_core_module_reads_another_objects_private_attributes(module: str) -> None:
    offending = []
    for node in ast.walk(_tree(module)):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        offending.append(f"line {node.lineno}: .{name}")
    assert offending == [], f"{module}.py reads private attributes of other objects: {offending}"
