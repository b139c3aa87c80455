"""Run the example named by ``EXAMPLE`` (default ``basic``)."""

from __future__ import annotations

import importlib
import os
import sys

name = os.environ.get("EXAMPLE", "basic")
try:
    module = importlib.import_module(f"examples.{name}")
except ModuleNotFoundError:
    sys.exit(f"no example named {name!r}; see examples/ for the list")
sys.exit(module.main())
