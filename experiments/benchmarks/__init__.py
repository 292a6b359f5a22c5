"""Benchmark suites: each module has `run(args) -> list[dict]` (rows of one printed table)."""
