import os

# Triton decides at decoration time (when qt.kernels is imported) whether a kernel runs in its CPU
# interpreter, so this must be set before anything imports qt.
os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches key a graph by the ops it calls, not by the Python that implements qt's
# ops: a cache left by an earlier version of qt would serve stale kernels. Each test session compiles afresh.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qt-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)  # ~8 MB a session


# Under pytest-xdist (`-n auto`, the README's command), each worker process takes its share of the cores: torch, and
# the processes the tests spawn, would otherwise each start a thread per core (2 workers on 2 cores ran the slow
# tests in 14.5 min with one thread each, 25.6 in one process).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

# Left out of the README's quick check (`python -m pytest -q -m "not slow" -n auto`): the tests that
# train through the command-line scripts end to end, spawn several processes or compile whole models (and
# tests marked slow themselves). CI runs every test.
_SLOW_MODULES = {"test_pretrain.py", "test_compare.py", "test_multinode.py", "test_distributed.py",
                 "test_llm_finetune.py", "test_timm_finetune.py", "test_reshard.py", "test_bench_scaling.py",
                 "test_bench_peers.py", "test_fsdp.py", "test_compile.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

