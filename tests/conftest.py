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


import pytest  # noqa: E402

# Left out of the README's quick check (`python -m pytest -q -m "not slow"`, about two minutes): the tests that
# train through the command-line scripts end to end, spawn several processes or compile whole models (and
# tests marked slow themselves). CI runs every test.
_SLOW_MODULES = {"test_pretrain.py", "test_compare.py", "test_multinode.py", "test_distributed.py",
                 "test_llm_finetune.py", "test_timm_finetune.py", "test_reshard.py", "test_bench_scaling.py",
                 "test_bench_peers.py", "test_fsdp.py", "test_compile.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

