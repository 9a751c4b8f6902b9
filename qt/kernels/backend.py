"""Which implementation a kernel call runs: Triton on CUDA, the torch fallback elsewhere.

`QT_KERNEL_BACKEND` overrides the choice, read at every call: `torch` forces the fallback (to
rule the kernels out while debugging), `triton` forces the Triton kernels also on CPU tensors,
which only works under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set before importing qt):
the tests run the recipes through the kernels that way. Under torch.compile the choice is made while Inductor
compiles the graph, and Inductor's on-disk caches (shared by the processes of a machine) keep a compiled graph
whatever the variable says later: set `TORCHINDUCTOR_CACHE_DIR` to a fresh directory when switching it for a
compiled run. (`QT_INT8_MM_KERNEL` is part of the traced graph, so caches keep it apart.)
"""

import os

import torch
from torch import Tensor
from torch.nn import Parameter

_CHOICES = ("auto", "triton", "torch")


def use_triton(t: Tensor, triton_available: bool) -> bool:
    choice = os.environ.get("QT_KERNEL_BACKEND", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"QT_KERNEL_BACKEND={choice!r}: use one of {', '.join(_CHOICES)}")
    if choice == "torch" or not triton_available:
        if choice == "triton":
            raise RuntimeError("QT_KERNEL_BACKEND=triton, but Triton is not installed: pip install triton")
        return False
    if not (choice == "triton" or t.is_cuda):
        return False
    # Triton's CPU interpreter runs kernels on real tensors only; traced (fake/functional) CPU tensors take the
    # torch ops, which torch.compile then fuses. On a GPU, torch.compile records the Triton launches themselves.
    return t.is_cuda or type(t) in (Tensor, Parameter)


def traced(*tensors: Tensor) -> bool:
    """True while torch.compile traces the call (then the custom op must be called, so the graph
    records one opaque node): under dynamo, or on the fake/functional tensors its tracing passes
    run ops on, which carry no data a kernel could read."""
    return torch.compiler.is_compiling() or any(type(t) not in (Tensor, Parameter) for t in tensors)


def eager_launch():
    """Context for eager kernel calls: Triton kernels launch directly, not through the wrapper that
    lets torch.compile record them (`torch.library.wrap_triton`)."""
    from torch._library.triton import set_wrap_triton_enabled

    return set_wrap_triton_enabled(False)


def realize_inputs_read_by_several_kernels() -> None:
    """Makes Inductor compute a tensor once when several Triton kernels of qt's ops read it, as it does for the
    inputs of its own matmuls.

    Inductor hands each launch of a user-defined Triton kernel its input with the exact strides it was traced
    with. A tensor not yet in memory (say the SwiGLU product, which the row-wise and column-wise quantize passes
    of the down projection both read) is then written into a fresh buffer for each launch: one kernel computing
    it and storing it once per reader. Seen on an H100 with torch 2.11: the SwiGLU forward wrote its product three
    times and its backward each gradient three times (twice BF16's time). Registering the launches as ops that need
    their inputs realized makes Inductor write such a tensor once, in a buffer every reader shares, where it is
    computed from two or more tensors (Inductor's rule; every such input of qt's linears is: a norm's output, the
    SwiGLU product and its gradients). It applies to every user-defined Triton kernel of the process, and only
    changes where a tensor is stored, not its values."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation
        from torch._inductor.lowering import needs_realized_inputs
    except ImportError:  # a torch without Inductor or without this hook: the kernels still run, with the copies
        return
    # Into the set itself: torch 2.11's add_needs_realized_inputs takes only OpOverloads and drops other ops.
    needs_realized_inputs.add(triton_kernel_wrapper_mutation)
