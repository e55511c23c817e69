"""Side-by-side benchmarks of ckpt against its peers (``python -m benchmarks.run``).

Every system runs on the same state in one process run; results are written to
``benchmarks/results/`` as JSON and Markdown (plus a plot of the core section).
"""
