"""README.rst is the package's long description: it must render, with no markup errors, and
every Python block in it must run as shown."""

from __future__ import annotations

import re
import sys
import textwrap
import types
from pathlib import Path

import docutils.core
import docutils.utils
import pymongo
import pytest

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_renders_without_warnings() -> None:
    # A malformed table or a broken reference renders as raw text on PyPI; halting at
    # warnings turns each into a SystemMessage naming the line.
    try:
        docutils.core.publish_doctree(
            README.read_text(encoding="utf-8"),
            source_path=str(README),
            settings_overrides={"halt_level": docutils.utils.Reporter.WARNING_LEVEL, "report_level": 5},
        )
    except docutils.utils.SystemMessage as exc:
        raise AssertionError(f"README.rst does not render cleanly: {exc}") from None


# -- every Python block runs as shown ---------------------------------------------------------------

_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:(?:[ ]{4}.*)?\n)+)", re.MULTILINE)
_URI = re.compile(r"([\"'])mongodb(?:\+srv)?://[^\"']*\1")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, dedented code) of each ``.. code-block:: python`` in README.rst."""
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(1))) for m in _BLOCK.finditer(text)]


def test_the_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize(
    ("line", "code"), python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_readme_python_block_runs(
    line: int, code: str, fake_rs: FakeReplicaSet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Runs a block as its own module against the fake replica set.

    The harness does two things only, both visible here: every ``"mongodb://..."``
    literal becomes the fake's URI, and ``Bus.run_forever()`` (which would block)
    starts the bus, inserts one document into the watched collection, waits until
    the callbacks have handled it and stops. Anything else a block needs it must
    define or import itself.
    """
    source = _URI.sub(repr(fake_rs.uri), code)
    handled: list[me.Bus] = []

    def run_briefly(self: me.Bus, stop_timeout: float = 30.0) -> None:
        self.start()
        db, _, coll = self.namespace.partition(".")
        if db and coll:
            with pymongo.MongoClient(fake_rs.uri, **CLIENT_OPTIONS) as writer:
                writer[db][coll].insert_one({"readme": line})
            assert self.join(10), f"README block at line {line}: the callbacks did not finish"
        self.stop(stop_timeout)
        handled.append(self)

    monkeypatch.setattr(me.Bus, "run_forever", run_briefly)
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"readme_line{line}")
    module.__file__ = str(tmp_path / f"readme_line{line}.py")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(source, f"README.rst, block at line {line}", "exec"), module.__dict__)
    finally:
        for value in list(module.__dict__.values()):
            if isinstance(value, me.Bus) and value not in handled:
                value.stop(5)
            elif type(value).__name__ == "MongoEvents":
                value.stop()
    if "run_forever()" in code:
        assert handled and all(bus.error is None for bus in handled)
