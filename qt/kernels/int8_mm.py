"""Scaled INT8 matrix multiplication: ``(a @ b) * row_scale * col_scale``.

``a`` [M, K] and ``b`` [K, N] are int8, the product is accumulated exactly in int32, and the scales are
applied in fp32 in the epilogue; or, with a scale per row of ``a`` per K_BLOCK elements of K, each block's int32
sums are scaled as a K step of the kernel completes them and summed in fp32. CUDA tensors run one of three kernels:
on Hopper, where its output tiles fill the GPU (and ``a`` has one scale a row), the Gluon kernel of
qt/kernels/int8_mm_gluon.py (an opaque op under torch.compile: Inductor cannot compile Gluon); else one of two Triton
kernels below, whose ``torch.library.triton_op`` compiled graphs launch directly (a persistent one fed by TMA on
Hopper and later GPUs, the classic one elsewhere and for operands TMA cannot address). QT_INT8_MM_KERNEL overrides
the choice (scales per block of K take the TMA kernel where it says gluon). CPU tensors (or a machine without Triton)
run ``torch._int_mm`` followed by the same fp32 epilogue.
"""

import functools
import os

import torch
from torch import Tensor

from qt.kernels.backend import eager_launch, traced, use_triton

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # qt must still import, and fall back to torch, where Triton is not installed.
    triton = None

# The K elements a scale covers where ``a`` has one per row per block of K: a K step of the kernels' GPU tiles.
K_BLOCK = 128


def scaled_int8_mm(
    a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Returns ``(a @ b) * row_scale * col_scale`` as an [M, N] tensor of ``out_dtype`` (by default
    ``row_scale.dtype``).

    Args:
        a: int8 [M, K], any strides (fastest when row-major, i.e. K-contiguous).
        b: int8 [K, N], any strides (fastest when column-major, i.e. K-contiguous).
        row_scale: floating [M, 1] or [M], one scale per row of ``a``; or [M, ceil(K / K_BLOCK)], one per row per
            block of K_BLOCK (128) elements of K (block j: K indices 128 j to 128 j + 127), where K is long and the
            values of ``a`` vary along it (grad_weight's tokens). Those run in the Triton kernels (not Gluon's).
        col_scale: floating [1, N] or [N] (one scale per column of ``b``), or a single element
            (one scale for all of ``b``, e.g. BitNet's tensor-wise weight scale).
    """
    _check_mm_inputs(a, b, row_scale, col_scale)
    out_dtype = out_dtype or row_scale.dtype
    # The kernel choice is read here, outside the op, and handed to it: a graph torch.compile traces then holds it,
    # so graphs compiled with different choices differ, and Inductor's caches (on disk, shared by the processes
    # of a machine) cannot hand a graph compiled with one choice to a process that asked for another.
    kernel = _kernel_choice()
    if not _k_blocked(row_scale) and _gluon_chosen(a, b, out_dtype, kernel):
        from qt.kernels.int8_mm_gluon import scaled_int8_mm_gluon

        if traced(a, b, row_scale, col_scale):
            return torch.ops.qt.scaled_int8_mm_gluon(a, b, row_scale, col_scale, out_dtype)
        return scaled_int8_mm_gluon(a, b, row_scale, col_scale, out_dtype)
    # The op is what torch.compile traces; eager calls skip its dispatch (tens of µs a call).
    if traced(a, b, row_scale, col_scale):
        return torch.ops.qt.scaled_int8_mm(a, b, row_scale, col_scale, out_dtype, kernel)
    with eager_launch():
        return _scaled_int8_mm(a, b, row_scale, col_scale, out_dtype, kernel)


def _check_mm_inputs(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(
            f"scaled_int8_mm: a and b must be int8 (got {a.dtype} and {b.dtype}); "
            "quantize them with quantize_int8 first"
        )
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"scaled_int8_mm: a and b must be 2-D (got shapes {list(a.shape)} and {list(b.shape)})")
    (m, k), (k_b, n) = a.shape, b.shape
    if k != k_b:
        raise ValueError(
            f"scaled_int8_mm: a is [M, K] = {list(a.shape)} so b must be [K, N] with K = {k}, got {list(b.shape)}"
        )
    for name, scale in (("row_scale", row_scale), ("col_scale", col_scale)):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scaled_int8_mm: {name} must be a floating-point tensor, got {scale.dtype}")
    k_blocks = (k + K_BLOCK - 1) // K_BLOCK
    if tuple(row_scale.shape) not in ((m, 1), (m,), (m, k_blocks)):
        raise ValueError(f"scaled_int8_mm: row_scale must have shape [{m}, 1] or [{m}] (one scale per row of a), or "
                         f"[{m}, {k_blocks}] (one per row per {K_BLOCK} elements of K = {k}), got "
                         f"{list(row_scale.shape)}")
    if tuple(col_scale.shape) not in ((1, n), (n,)) and col_scale.numel() != 1:
        raise ValueError(
            f"scaled_int8_mm: col_scale must have shape [1, {n}] or [{n}], or hold one element, "
            f"got {list(col_scale.shape)}"
        )
    devices = {t.device for t in (a, b, row_scale, col_scale)}
    if len(devices) != 1:
        raise ValueError(f"scaled_int8_mm: all inputs must be on one device, got {sorted(map(str, devices))}")


def _k_blocked(row_scale: Tensor) -> bool:
    """Whether ``row_scale`` holds a scale per row per K_BLOCK elements of K (more than one block)."""
    return row_scale.dim() == 2 and row_scale.shape[1] > 1


def _row_scale_strides(row_scale: Tensor) -> tuple[int, int]:
    """(stride between rows, stride between K blocks) of ``row_scale``'s elements."""
    if _k_blocked(row_scale):
        return row_scale.stride(0), row_scale.stride(1)
    return _scale_stride(row_scale), 0


def _gluon_chosen(a: Tensor, b: Tensor, out_dtype: torch.dtype, kernel: str) -> bool:
    """Whether the Gluon kernel runs this matmul: chosen (`gluon`, a one-line error where it cannot run), or picked
    by `auto` on a Hopper GPU (compute capability 9.x: its wgmma instructions are Hopper's) where Triton has Gluon
    and its output tiles keep at least half of the SMs busy. With fewer, the TMA kernel's autotuned smaller tiles
    win: the 124M Llama's grad_weight, a [768, 768] or [768, 2560] output over 16k tokens, ran at 0.68-0.69x the
    TMA kernel's speed in Gluon's 128 x 256 tiles (docs/kernels.md, round 19). QT_KERNEL_BACKEND=torch rules it out
    with the other kernels."""
    if kernel not in ("auto", "gluon") or os.environ.get("QT_KERNEL_BACKEND") == "torch":
        return False
    from qt.kernels import int8_mm_gluon

    runs = int8_mm_gluon.gluon is not None and a.is_cuda and _compute_capability(a.device)[0] == 9
    if kernel == "gluon":
        if not runs:
            raise RuntimeError("QT_INT8_MM_KERNEL=gluon needs a Hopper GPU (compute capability 9.x) and Triton 3.5 "
                               "or newer; unset it to use the Triton kernels")
        return True
    block_m, block_n, _, _ = int8_mm_gluon.CONFIGS[out_dtype]
    return runs and 2 * triton.cdiv(a.shape[0], block_m) * triton.cdiv(b.shape[1], block_n) >= _persistent_programs(
        a.device)


def _scale_stride(scale: Tensor) -> int:
    """Element stride between consecutive scales of a [X, 1], [1, X] or [X] vector; 0 broadcasts one scale."""
    long_dims = [dim for dim, size in enumerate(scale.shape) if size > 1]
    return scale.stride(long_dims[0]) if long_dims else 0


def _scaled_int8_mm(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out_dtype: torch.dtype,
                    kernel: str = "auto") -> Tensor:
    if 0 in (*a.shape, b.shape[1]):  # e.g. a micro-batch without tokens; an empty reduction sums to 0
        return torch.zeros((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    if use_triton(a, triton is not None):
        return _triton_scaled_int8_mm(a, b, row_scale, col_scale, out_dtype, kernel)
    return _torch_scaled_int8_mm(a, b, row_scale, col_scale, out_dtype)


if triton is not None:
    torch.library.triton_op("qt::scaled_int8_mm", _scaled_int8_mm, mutates_args=())
else:
    torch.library.custom_op("qt::scaled_int8_mm", _scaled_int8_mm, mutates_args=())
    torch.library.register_fake("qt::scaled_int8_mm")(
        lambda a, b, row_scale, col_scale, out_dtype, kernel="auto": a.new_empty((a.shape[0], b.shape[1]),
                                                                                   dtype=out_dtype))


def _with_clear_strides(t: Tensor) -> Tensor:
    """``t``, copied to the standard row-major strides when it has a size-1 dimension: torch._int_mm on CPU
    computes garbage for such operands with other strides (a [1, K] row with strides (1, 1), as a
    transposed [K, 1] column has; seen with torch 2.13). Such an operand is a vector: the copy is cheap."""
    return t.clone(memory_format=torch.contiguous_format) if 1 in t.shape else t


def _torch_scaled_int8_mm(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    col_scale = col_scale.reshape(1, -1).float()
    if _k_blocked(row_scale):  # block by block, in the kernels' order
        out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
        for block, start in enumerate(range(0, a.shape[1], K_BLOCK)):
            part = torch._int_mm(_with_clear_strides(a[:, start:start + K_BLOCK]),
                                 _with_clear_strides(b[start:start + K_BLOCK]))
            out += part.float() * row_scale[:, block:block + 1].float()
        return (out * col_scale).to(out_dtype)
    product = torch._int_mm(_with_clear_strides(a), _with_clear_strides(b)).float()
    # Same epilogue as the kernel, in the same order, so both paths round alike.
    return (product * (row_scale.reshape(-1, 1).float() * col_scale)).to(out_dtype)


# QT_INT8_MM_KERNEL, read at every call (under torch.compile: when the call is traced), picks the kernel: `auto` the
# Gluon kernel of qt/kernels/int8_mm_gluon.py on Hopper GPUs (compute capability 9.x, e.g. H100) where its tiles fill
# half the SMs (1.08-1.17x the TMA kernel's speed there; docs/kernels.md, round 19), else the persistent TMA kernel
# on GPUs that have TMA (9.0 and up), else the classic one; `gluon` the Gluon kernel (Hopper only); `tma` the TMA
# kernel, also off GPUs (Triton's CPU interpreter runs it); `classic` the classic kernel everywhere. Operands TMA
# cannot address take the classic kernel whatever the choice.
_KERNEL_CHOICES = ("auto", "tma", "classic", "gluon")
# Programs of the persistent kernel under Triton's CPU interpreter: fewer than the tiles of a small test, so
# programs loop over several tiles as they do on a GPU.
_INTERPRETER_PROGRAMS = 3


def _kernel_choice() -> str:
    choice = os.environ.get("QT_INT8_MM_KERNEL", "auto")
    if choice not in _KERNEL_CHOICES:
        raise ValueError(f"QT_INT8_MM_KERNEL={choice!r}: use one of {', '.join(_KERNEL_CHOICES)}")
    return choice


def _triton_scaled_int8_mm(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out_dtype: torch.dtype,
                           kernel: str) -> Tensor:
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    launch = _launch_tma_kernel if _use_tma_kernel(a, b, out, kernel) else _launch_classic_kernel
    launch(a, b, row_scale, col_scale, out)
    return out


def _use_tma_kernel(a: Tensor, b: Tensor, out: Tensor, kernel: str) -> bool:
    if kernel not in _KERNEL_CHOICES:
        raise ValueError(f"scaled_int8_mm kernel {kernel!r}: use one of {', '.join(_KERNEL_CHOICES)}")
    if kernel == "classic" or (kernel == "auto" and not (a.is_cuda and _compute_capability(a.device) >= (9, 0))):
        return False
    return _tma_can_address(a, b, out)


def _tma_can_address(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """Whether TMA descriptors can address a [M, K], b through b.T [N, K] and out [M, N]: each contiguous along
    its last dimension, with a 16-byte aligned start and row stride (TMA's requirements). The recipes' operands
    are K-contiguous, a row-major and b column-major, so this holds where K is a multiple of 16 and N of 8."""
    return all(
        t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and _address(t) % 16 == 0
        for t in (a, b.t(), out)
    )


def _address(t: Tensor) -> int:
    # A traced (fake) tensor has no address. Its storage is taken to start aligned, as memory from torch's
    # allocators does (512 bytes on CUDA), so only its offset into the storage counts.
    return t.storage_offset() * t.element_size() if traced(t) else t.data_ptr()


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent kernel: one per SM on a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    # The CUDA caching allocator aligns to 512 bytes, more than the 128 TMA descriptors need.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch_tma_kernel(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out: Tensor) -> None:
    m, k = a.shape
    n = b.shape[1]
    programs = _persistent_programs(a.device)

    def grid(meta):
        return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    # The kernel writes its TMA descriptors to global memory that Triton asks this allocator for at each launch.
    # The allocator is per thread (a ContextVar) and backward passes launch from autograd's threads: set it at
    # every call. (In graphs compiled by Inductor, Inductor sets its own before each launch.)
    triton.set_allocator(_descriptor_scratch)
    wrap_triton(_persistent_tma_scaled_int8_mm_kernel)[grid](
        a, b, row_scale, col_scale, out,
        m, n, k, triton.next_power_of_2(m), triton.next_power_of_2(k),
        a.stride(0), b.stride(1), out.stride(0),
        *_row_scale_strides(row_scale), _scale_stride(col_scale),
        PROGRAMS=programs, K_BLOCK_SCALED=_k_blocked(row_scale),
    )  # fmt: skip


def _launch_classic_kernel(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out: Tensor) -> None:
    m, k = a.shape
    n = b.shape[1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(_scaled_int8_mm_kernel)[grid](
        a, b, row_scale, col_scale, out,
        m, n, k, triton.next_power_of_2(m), triton.next_power_of_2(k),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *_row_scale_strides(row_scale), _scale_stride(col_scale),
        out.stride(0), out.stride(1),
        EVEN_K=k % _LARGEST_BLOCK_K == 0, K_BLOCK_SCALED=_k_blocked(row_scale),
    )  # fmt: skip


# Every config's BLOCK_K divides this, so one divisibility test (EVEN_K, passed in) serves them all.
_LARGEST_BLOCK_K = 128


def _interpreted() -> bool:
    # The interpreter runs every config it is given in numpy, slowly: it gets one small tile, no tuning.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _autotune_configs() -> list:
    if _interpreted():  # a K step of K_BLOCK, which a scale per block of K needs (the autotuner prunes no lone config)
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": K_BLOCK, "GROUP_M": 4})]
    # Tiles known to run well for int8 wgmma on Hopper; a longer list only lengthens the first call.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def _k_block_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """The configs a launch may take: with a scale per K_BLOCK of K, those whose K step is one block."""
    if not {**named_args, **kwargs}["K_BLOCK_SCALED"]:
        return configs
    return [config for config in configs if config.kwargs["BLOCK_K"] == K_BLOCK]


def _tma_autotune_configs() -> list:
    """Tiles for the persistent TMA kernel. Triton (3.6) waits for each int8 wgmma before issuing the next K
    step's (it keeps a wgmma in flight only for fp32 accumulators), so a BLOCK_K of 256 halves those waits at the
    cost of a pipeline stage. EPILOGUE_SUBTILE stores each tile in two halves of BLOCK_N / 2 columns: the
    shared buffer the TMA store goes through halves, leaving room for another stage of operands. All of these fit
    the H100's 227 KiB of shared memory with a bf16 output; with an fp32 output only the first does, and the
    autotuner skips the others."""
    if _interpreted():  # as _autotune_configs
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": K_BLOCK, "GROUP_M": 4,
                               "EPILOGUE_SUBTILE": True})]

    def config(block_m, block_n, block_k, subtile, num_stages):
        return triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "EPILOGUE_SUBTILE": subtile},
            num_warps=8, num_stages=num_stages,
        )  # fmt: skip

    return [
        config(128, 256, 128, True, 3),
        config(128, 256, 128, True, 4),
        config(256, 128, 128, True, 4),
        config(128, 256, 256, True, 2),
        config(256, 128, 256, True, 2),
        config(128, 128, 256, False, 3),
    ]


if triton is not None:

    @triton.jit
    def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """(row, column) of output tile `tile_id` in grouped order: GROUP_M consecutive tiles walk down a column
        of tiles, so the tiles of b they share are still in L2 when the next one needs them."""
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _add_k_block(scaled_acc, block_acc, row_scale_ptr, offs_m, M, k_block, stride_row_scale,
                     stride_row_scale_k):
        """``scaled_acc`` plus the int32 sums of one K block, ``block_acc``, times the block's scale of each row."""
        row_scale = tl.load(row_scale_ptr + offs_m * stride_row_scale + k_block * stride_row_scale_k, mask=offs_m < M)
        return scaled_acc + block_acc.to(tl.float32) * row_scale.to(tl.float32)[:, None]

    _K_STEP_OF_A_BLOCK = tl.constexpr(K_BLOCK)

    @triton.jit
    def _accumulate(acc, a, b, row_scale_ptr, offs_m, M, k_block, stride_row_scale, stride_row_scale_k,
                    K_BLOCK_SCALED: tl.constexpr):
        """``acc`` after the K step ``a @ b``: int32 sums, or with K_BLOCK_SCALED (a K step is then a block) fp32 sums
        of each block's int32 sums times its row scales."""
        # One return after the branches: Triton's compiler (not its interpreter) fails on a return inside a
        # constexpr branch followed by another of a different type.
        if K_BLOCK_SCALED:
            # The autotuner's pruning (_k_block_tiles) leaves only such configs; a K step of any other length would
            # give wrong sums, so it fails to compile instead.
            tl.static_assert(a.shape[1] == _K_STEP_OF_A_BLOCK, "scales per block of K need a K step of K_BLOCK")
            acc = _add_k_block(acc, tl.dot(a, b, out_dtype=tl.int32), row_scale_ptr, offs_m, M, k_block,
                               stride_row_scale, stride_row_scale_k)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def _scaled(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale):
        """The fp32 epilogue of both kernels (and of qt/kernels/int8_mm_gluon.py's): the int32 sums `acc` of rows
        offs_m and columns offs_n, scaled."""
        row_scale = tl.load(row_scale_ptr + offs_m * stride_row_scale, mask=offs_m < M).to(tl.float32)
        col_scale = tl.load(col_scale_ptr + offs_n * stride_col_scale, mask=offs_n < N).to(tl.float32)
        # The scales multiply each other first: the product of the two fits in fp32 wherever the result
        # does, while the INT32 sum times one scale can overflow (inputs near 1e37).
        return acc.to(tl.float32) * (row_scale[:, None] * col_scale[None, :])

    @triton.jit
    def _epilogue(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale,
                  K_BLOCK_SCALED: tl.constexpr):
        """The output tile from `_accumulate`'s sums: scaled, or with K_BLOCK_SCALED (row scales applied) times the
        column scales."""
        if K_BLOCK_SCALED:
            col_scale = tl.load(col_scale_ptr + offs_n * stride_col_scale, mask=offs_n < N).to(tl.float32)
            out = acc * col_scale[None, :]
        else:
            out = _scaled(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale)
        return out

    # M_BUCKET and K_BUCKET (rounded up to a power of two) stand in for M and K in the key: the token count,
    # which is M of the forward and grad_input matmuls and K of grad_weight's, changes from batch to batch
    # when fine-tuning on padded batches, and re-tuning for every new count would stall training.
    @triton.autotune(configs=_autotune_configs(), key=["M_BUCKET", "N", "K_BUCKET", "EVEN_K", "K_BLOCK_SCALED"],
                     prune_configs_by={"early_config_prune": _k_block_tiles})
    @triton.jit
    def _scaled_int8_mm_kernel(
        a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, out_ptr,
        M, N, K, M_BUCKET, K_BUCKET,
        stride_am, stride_ak, stride_bk, stride_bn,
        stride_row_scale, stride_row_scale_k, stride_col_scale,
        stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, K_BLOCK_SCALED: tl.constexpr,
    ):  # fmt: skip
        """The classic kernel: one program per output tile, operands loaded through pointers (any strides)."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Edges are masked rather than wrapped around (offs % N): a wrapped index hides from the compiler
        # that the offsets are contiguous, so a row-major b was loaded a byte at a time (about 100 instead
        # of 280 TOP/s on an H100). The int64 offsets keep tensors past 2**31 elements addressable.
        m_in_bounds = offs_m < M
        n_in_bounds = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if K_BLOCK_SCALED else tl.int32)
        for k_start in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=m_in_bounds[:, None], other=0)
                b = tl.load(b_ptrs, mask=n_in_bounds[None, :], other=0)
            else:
                # Zeros past the end of K add nothing to the dot product.
                k_in_bounds = offs_k < K - k_start
                a = tl.load(a_ptrs, mask=m_in_bounds[:, None] & k_in_bounds[None, :], other=0)
                b = tl.load(b_ptrs, mask=k_in_bounds[:, None] & n_in_bounds[None, :], other=0)
            acc = _accumulate(acc, a, b, row_scale_ptr, offs_m, M, k_start // BLOCK_K, stride_row_scale,
                              stride_row_scale_k, K_BLOCK_SCALED)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        out = _epilogue(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale,
                        K_BLOCK_SCALED)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_in_bounds[:, None] & n_in_bounds[None, :])

    @triton.jit
    def _store_scaled_tile(
        out_desc, acc, row_scale_ptr, col_scale_ptr, start_m, start_n, M, N, stride_row_scale, stride_col_scale,
        K_BLOCK_SCALED: tl.constexpr,
    ):  # fmt: skip
        offs_m = start_m + tl.arange(0, acc.shape[0])
        offs_n = start_n + tl.arange(0, acc.shape[1])
        out = _epilogue(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale,
                        K_BLOCK_SCALED)
        out_desc.store([start_m, start_n], out.to(out_desc.dtype))

    @triton.autotune(configs=_tma_autotune_configs(), key=["M_BUCKET", "N", "K_BUCKET", "K_BLOCK_SCALED"],
                     prune_configs_by={"early_config_prune": _k_block_tiles})
    @triton.jit
    def _persistent_tma_scaled_int8_mm_kernel(
        a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, out_ptr,
        M, N, K, M_BUCKET, K_BUCKET,
        stride_am, stride_bn, stride_om,
        stride_row_scale, stride_row_scale_k, stride_col_scale,
        PROGRAMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr, K_BLOCK_SCALED: tl.constexpr,
    ):  # fmt: skip
        """The Hopper kernel: PROGRAMS programs (one per SM) loop over the output tiles; TMA copies the operand
        tiles to shared memory and the scaled tiles back. a is row-major, b column-major (read as b.T [N, K])."""
        # TMA reads past an edge of a tensor as zeros, which add nothing to the sums, and drops writes past one.
        a_desc = tl.make_tensor_descriptor(
            a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K]
        )
        b_desc = tl.make_tensor_descriptor(
            b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K]
        )
        OUT_BLOCK_N: tl.constexpr = BLOCK_N // 2 if EPILOGUE_SUBTILE else BLOCK_N
        out_desc = tl.make_tensor_descriptor(
            out_ptr, shape=[M, N], strides=[stride_om, 1], block_shape=[BLOCK_M, OUT_BLOCK_N]
        )
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        # The epilogue finds its tile from a counter of its own rather than from tile_id, as Triton's persistent
        # matmul tutorial does to keep one value out of both the loads and the epilogue of the flattened,
        # software-pipelined loop (a workaround it gives for a pipelining bug on Blackwell).
        epilogue_tile_id = tl.program_id(0) - PROGRAMS
        # flatten=True makes one loop of tiles x K steps, so the loads of the next tile overlap this tile's epilogue.
        for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, PROGRAMS, flatten=True):
            pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if K_BLOCK_SCALED else tl.int32)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # the rows whose K blocks' scales the loop reads
            for k_tile in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, k_tile * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, k_tile * BLOCK_K])
                acc = _accumulate(acc, a, b.T, row_scale_ptr, offs_m, M, k_tile, stride_row_scale, stride_row_scale_k,
                                  K_BLOCK_SCALED)

            epilogue_tile_id += PROGRAMS
            pid_m, pid_n = _grouped_tile(epilogue_tile_id, num_pid_m, num_pid_n, GROUP_M)
            if EPILOGUE_SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _store_scaled_tile(out_desc, left, row_scale_ptr, col_scale_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                   M, N, stride_row_scale, stride_col_scale, K_BLOCK_SCALED)  # fmt: skip
                _store_scaled_tile(out_desc, right, row_scale_ptr, col_scale_ptr, pid_m * BLOCK_M,
                                   pid_n * BLOCK_N + BLOCK_N // 2, M, N, stride_row_scale, stride_col_scale,
                                   K_BLOCK_SCALED)  # fmt: skip
            else:
                _store_scaled_tile(out_desc, acc, row_scale_ptr, col_scale_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                   M, N, stride_row_scale, stride_col_scale, K_BLOCK_SCALED)  # fmt: skip
