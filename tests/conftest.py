import os

# Triton decides at decoration time (when qt.kernels is imported) whether a kernel runs in its CPU
# interpreter, so this must be set before anything imports qt.
os.environ.setdefault("TRITON_INTERPRET", "1")
