"""Run a kernel entry point through one backend: the Triton kernels (interpreted on CPU) or torch's."""

import os


def through(backend: str, fn):
    """`fn` called with QT_KERNEL_BACKEND=`backend` (the environment restored afterwards)."""

    def call(*args, **kwargs):
        previous = os.environ.get("QT_KERNEL_BACKEND")
        os.environ["QT_KERNEL_BACKEND"] = backend
        try:
            return fn(*args, **kwargs)
        finally:
            if previous is None:
                del os.environ["QT_KERNEL_BACKEND"]
            else:
                os.environ["QT_KERNEL_BACKEND"] = previous

    return call
