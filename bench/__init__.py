"""Benchmarks of moe_kernels: ``python -m bench --help``."""
