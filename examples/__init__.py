"""Runnable examples: ``EXAMPLE=basic python -m examples`` or ``python examples/basic.py``."""
