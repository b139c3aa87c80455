"""``python -m tests.crash --kills 1000 --changes 50000``: the long crash test."""

from __future__ import annotations

import sys

from .harness import main

sys.exit(main())
