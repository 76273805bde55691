"""Outside the core: what reports on training runs rather than running them (the memory reports of the
profile_memory command). The throughput harness is benchmarks/step_runners.py, outside the package."""
