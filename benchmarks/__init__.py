"""The benchmark harness of dsrna: every backend timed against the pure-PyTorch reference.

Run it as ``dsrna bench`` or ``python -m benchmarks`` from the repository root; ``gpu_check.sh``
builds, tests and benchmarks on a GPU machine in one time-boxed go. See ``benchmarks/README.md``.
"""
