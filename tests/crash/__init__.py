"""Crash testing: a consumer process killed at random moments must lose nothing."""
