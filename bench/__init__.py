"""Benchmarks (not part of the test suite): ``python -m bench.suite`` or ``make bench``."""
