import os

# Triton decides at decoration time (when qt.kernels is imported) whether a kernel runs in its CPU
# interpreter, so this must be set before anything imports qt.
os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches key a graph by the ops it calls, not by the Python that implements qt's
# ops: a cache left by an earlier version of qt would serve stale kernels. Each test session compiles afresh.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qt-tests-inductor-")
