"""Outside the core: what measures and reports on training runs rather than running them (the
throughput harness of benchmarks/throughput.py, the memory reports of launch/profile_memory.py)."""
