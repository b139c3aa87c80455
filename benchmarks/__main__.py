"""``python -m benchmarks``: run the throughput, latency, round-trip and memory benchmark."""

from __future__ import annotations

import sys

from .run import main

sys.exit(main())
