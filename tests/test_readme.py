"""README.rst is the package's long description: it must render, with no markup errors."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import docutils.utils

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
