"""The multi-process rank harness lives in parallel/local_ranks.py (benchmarks use it too)."""
from parallel.local_ranks import free_port, run_ranks  # noqa: F401
