"""qt's scaled INT8 matmul for Hopper written in Gluon, which keeps each int8 wgmma in flight while the next is issued.

Triton 3.6's pipeliner makes a wgmma asynchronous only for fp32 accumulators (WGMMAPipeline.cpp, "Rule 2.1"), so
qt's Triton kernels (qt/kernels/int8_mm.py) wait for every int8 wgmma to finish before issuing the next K step's
(`wgmma.wait_group 0` after each). In Gluon the kernel says what to wait for: after issuing the wgmma of K step i it
waits until at most one is in flight (step i's), so step i-1's operand buffers are free for the tiles NUM_BUFFERS - 1
steps ahead. Persistent: one program per SM loops over the output tiles in grouped order, and the next tile's first
loads go out before this tile's epilogue.

Same contract and bits as the TMA kernel of qt/kernels/int8_mm.py: a [M, K] row-major int8, b [K, N] column-major
int8 (read as b.T [N, K]), out [M, N] = (a @ b) * (row_scale * col_scale) in its fp32 epilogue.

Inductor cannot compile a Gluon kernel into its graphs (it re-decorates a user kernel's source with triton.jit), so
the op is opaque to torch.compile: a Python call per matmul in compiled graphs."""

import torch
from torch import Tensor

from qt.kernels.backend import eager_launch
from qt.kernels.int8_mm import (_descriptor_scratch, _persistent_programs, _scale_stride, _scaled_int8_mm,
                                _tma_can_address)

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except ImportError:  # no Triton, or one without Gluon (before 3.5)
    gluon = None

# (BLOCK_M, BLOCK_N, BLOCK_K, NUM_BUFFERS) of 8-warp programs for a bf16 output and for an fp32 one (whose tile in
# shared memory is twice the size): each fits the H100's 227 KiB of shared memory.
CONFIGS = {torch.bfloat16: (128, 256, 128, 3), torch.float16: (128, 256, 128, 3), torch.float32: (128, 128, 128, 4)}


def scaled_int8_mm_gluon(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a @ b) * row_scale * col_scale`` on a Hopper GPU, inputs checked by qt.kernels.int8_mm. Operands TMA
    cannot address, and empty ones, take qt.kernels.int8_mm's Triton kernels. Decided here, on real tensors: under
    torch.compile this runs inside the opaque op, where tensors have addresses."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype, device=a.device)
    if 0 in (*a.shape, b.shape[1]) or not _tma_can_address(a, b, out):
        with eager_launch():
            return _scaled_int8_mm(a, b, row_scale, col_scale, out_dtype, "tma")
    return launch(a, b, row_scale, col_scale, out, CONFIGS[out_dtype])


def launch(a: Tensor, b: Tensor, row_scale: Tensor, col_scale: Tensor, out: Tensor,
           config: tuple[int, int, int, int], programs: int | None = None) -> Tensor:
    """The kernel into ``out`` with ``config`` = (BLOCK_M, BLOCK_N, BLOCK_K, NUM_BUFFERS), for benchmarks of the
    configs too; ``programs`` (benchmarks: scripts/bench_comm_overlap.py) overrides the program count, one per SM."""
    m, k = a.shape
    n = b.shape[1]
    block_m, block_n, block_k, buffers = config
    programs = min(programs or _persistent_programs(a.device), triton.cdiv(m, block_m) * triton.cdiv(n, block_n))
    triton.set_allocator(_descriptor_scratch)
    _gluon_scaled_int8_mm_kernel[(programs,)](
        a, b, row_scale, col_scale, out, m, n, k, a.stride(0), b.stride(1), out.stride(0),
        _scale_stride(row_scale), _scale_stride(col_scale),
        PROGRAMS=programs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, NUM_BUFFERS=buffers,
        INSTR_N=min(block_n, 128), num_warps=8,
    )  # fmt: skip
    return out


# The op compiled graphs call, defined through torch.library's lower-level API: a kernel for CUDA tensors and a fake
# one for tracing. torch.library.custom_op wraps its kernel in Python dispatch layers (autograd among them), which on
# a 2-core CPU machine took 39-46 us a call against 16-17 this way (a kernel that only allocates its output: the
# dispatch alone; docs/kernels.md round 20); nothing here needs autograd (codes and scales never require grad), and a
# compiled TinyLlama step makes 330 of these calls.
_LIBRARY = torch.library.Library("qt", "FRAGMENT")
_LIBRARY.define("scaled_int8_mm_gluon(Tensor a, Tensor b, Tensor row_scale, Tensor col_scale, ScalarType out_dtype) "
                "-> Tensor")
_LIBRARY.impl("scaled_int8_mm_gluon", scaled_int8_mm_gluon, "CUDA")
torch.library.register_fake("qt::scaled_int8_mm_gluon")(
    lambda a, b, row_scale, col_scale, out_dtype: a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype))


if gluon is not None:
    # @triton.jit functions, which Gluon kernels call too: the TMA kernel's tile order and fp32 epilogue.
    from qt.kernels.int8_mm import _grouped_tile, _scaled

    @gluon.jit
    def _issue_loads(load_count, a_desc, b_desc, off_m, off_n, k, bars, a_bufs, b_bufs, NUM_BUFFERS: gl.constexpr,
                     pred):
        """TMA copies of a's and b's tiles at K offset k into slot load_count % NUM_BUFFERS, where pred."""
        index = load_count % NUM_BUFFERS
        bar = bars.index(index)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_bufs.index(index), pred)
        tma.async_copy_global_to_shared(b_desc, [off_n, k], bar, b_bufs.index(index), pred)
        return load_count + pred.to(gl.int32)

    @gluon.jit
    def _gluon_scaled_int8_mm_kernel(
        a_ptr, b_ptr, row_scale_ptr, col_scale_ptr, out_ptr,
        M, N, K, stride_am, stride_bn, stride_om, stride_row_scale, stride_col_scale,
        PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        GROUP_M: gl.constexpr, NUM_BUFFERS: gl.constexpr, INSTR_N: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.int8)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.int8)
        out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], out_ptr.dtype.element_ty)
        # TMA reads past an edge as zeros, which add nothing to the sums, and drops writes past one.
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K], a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K], b_layout)
        out_desc = tma.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N], out_layout)
        # Warpgroups stacked along M, each issuing m64 x INSTR_N x k32 int8 wgmmas.
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, INSTR_N, 32])
        a_bufs = gl.allocate_shared_memory(gl.int8, [NUM_BUFFERS, BLOCK_M, BLOCK_K], a_layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [NUM_BUFFERS, BLOCK_N, BLOCK_K], b_layout)
        out_smem = gl.allocate_shared_memory(out_ptr.dtype.element_ty, [BLOCK_M, BLOCK_N], out_layout)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_BUFFERS):
            mbarrier.init(bars.index(i), count=1)

        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        # Loads issued and tiles consumed, counted over all of this program's tiles: a count's slot is
        # count % NUM_BUFFERS, and the phase of that slot's barrier (count // NUM_BUFFERS) & 1.
        load_count = 0
        use_count = 0

        pid_m, pid_n = _grouped_tile(gl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        for i in gl.static_range(NUM_BUFFERS - 1):
            load_count = _issue_loads(load_count, a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, i * BLOCK_K,
                                      bars, a_bufs, b_bufs, NUM_BUFFERS, i < k_tiles)
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, PROGRAMS):
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.int32, layout=mma_layout)
            for k_tile in range(k_tiles):
                slot = use_count % NUM_BUFFERS
                mbarrier.wait(bars.index(slot), (use_count // NUM_BUFFERS) & 1)
                use_count += 1
                acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), acc, is_async=True)
                # At most this step's wgmma in flight: the previous step's slot takes the tiles of the step
                # NUM_BUFFERS - 1 ahead.
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                next_k = k_tile + NUM_BUFFERS - 1
                load_count = _issue_loads(load_count, a_desc, b_desc, off_m, off_n, next_k * BLOCK_K, bars, a_bufs,
                                          b_bufs, NUM_BUFFERS, next_k < k_tiles)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

            # Every slot is free: the next tile's first loads go out before this tile's epilogue. Fixed shares of
            # the tiles: beside a kernel that holds SMs (NCCL's under FSDP2) the programs that start late make the
            # matmul wait for their whole share (1.6-2.0x slower beside an all-gather on 2 H200s, cuBLAS BF16
            # 1.2-1.3x). Handing tiles out on demand (an atomic counter, commit 7cf6bb6) cut that to 1.2-1.5x but
            # ran 1-10% slower alone; its one end-to-end run on 2 GPUs fell inside the run-to-run spread
            # (docs/kernels.md round 24, docs/scaling.md round 25).
            next_tile = tile_id + PROGRAMS
            pid_m, pid_n = _grouped_tile(next_tile, num_pid_m, num_pid_n, GROUP_M)
            for i in gl.static_range(NUM_BUFFERS - 1):
                load_count = _issue_loads(load_count, a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, i * BLOCK_K,
                                          bars, a_bufs, b_bufs, NUM_BUFFERS,
                                          (next_tile < num_pid_m * num_pid_n) & (i < k_tiles))

            offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
            out = _scaled(acc, row_scale_ptr, col_scale_ptr, offs_m, offs_n, M, N, stride_row_scale, stride_col_scale)
            tma.store_wait(pendings=0)  # the previous tile's store has left out_smem
            out_smem.store(out.to(out_ptr.dtype.element_ty))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_smem)
        tma.store_wait(pendings=0)
        for i in gl.static_range(NUM_BUFFERS):
            mbarrier.invalidate(bars.index(i))
