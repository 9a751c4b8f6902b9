"""CPU offload: optimizer states, FP32 master weights and the optimizer step on the CPU.

For the biggest model one GPU can hold: the GPU keeps only the weights the model computes with (e.g.
BF16) and, transiently, the gradients of the backward pass in flight. Each parameter's gradient is
copied to pinned CPU memory as soon as the backward pass has finished it (a post-accumulate-grad hook,
on a side CUDA stream, so the copies overlap the rest of the backward pass) and its GPU memory is freed
at once. `step()` waits for the copies, steps the FP32 masters with any optimizer on the CPU (torch's
fused CPU AdamW by default) and copies the new weights back on the side stream; the next forward pass
waits for them on the GPU, not the host.

Training quality is that of FP32 master weights (the update is applied in FP32, not rounded to BF16),
at less GPU memory than pure BF16 training: no states and no gradients persist there. The price is the
CPU step (memory-bound: ~16 bytes read and written per parameter) and PCIe traffic, so it pays at large
batch or with gradient accumulation.

Gradient clipping must see the CPU gradients: call `optimizer.clip_grad_norm_(max_norm)` (the training
loop does) instead of `torch.nn.utils.clip_grad_norm_(model.parameters())`, which sees no gradients.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from qt.subclass import QuantizedWeight


class CPUOffloadOptimizer(Optimizer):
    def __init__(self, params, optimizer_class: type[Optimizer] = torch.optim.AdamW, **kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        if optimizer_class is torch.optim.AdamW and not {"fused", "foreach"} & kwargs.keys():
            kwargs["fused"] = True  # ~6x faster than the single-tensor step on a CPU
        self.params: list[Tensor] = []
        self.masters: dict[Tensor, Tensor] = {}  # GPU parameter -> its FP32 master on the CPU
        # GPU parameter -> a pinned buffer of its dtype, from which the new weight is copied back
        # asynchronously.
        self._staging: dict[Tensor, Tensor] = {}
        master_groups = []
        for group in groups:
            master_group = {k: v for k, v in group.items() if k != "params"}
            # Frozen parameters get no gradient, hence no update (torch.optim skips them too): no master, and
            # no gradient hook, which autograd refuses on them. Unfreezing one later does not bring it in.
            master_group["params"] = [self._add_param(p) for p in group["params"] if p.requires_grad]
            master_groups.append(master_group)
        self.inner = optimizer_class(master_groups, **kwargs)
        super().__init__(master_groups, self.inner.defaults)
        # One set of groups and states: what an LR scheduler or the loop writes into param_groups reaches
        # the optimizer that steps.
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        cuda = any(p.is_cuda for p in self.params)
        self.stream = torch.cuda.Stream(self.params[0].device) if cuda else None
        self._pending: dict[Tensor, list[tuple[Tensor, Any]]] = {}  # parameter -> its gradient copies

    def _add_param(self, p: Tensor) -> Tensor:
        if isinstance(p, QuantizedWeight) or type(p.data) is not Tensor:
            raise ValueError("CPU offload steps plain parameters; it cannot offload quantized or FSDP2-sharded "
                             f"weights ({type(p.data).__name__}): use it with --quantize none on one process")
        master = p.detach().to("cpu", torch.float32, copy=True)
        if p.is_cuda:
            master = master.pin_memory()
            self._staging[p] = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
        self.params.append(p)
        self.masters[p] = master
        # The hook lives in autograd's C++ graph, where Python's collector cannot see a cycle through it: a
        # hook holding the optimizer would keep the optimizer, and through it the model, alive forever.
        p.register_post_accumulate_grad_hook(functools.partial(_offload_grad_if_alive, weakref.ref(self)))
        return master

    def _offload_grad(self, p: Tensor) -> None:
        """Start copying p's finished gradient to the CPU and free it on the GPU. Under gradient
        accumulation each micro-step's gradient is copied; step() sums them."""
        grad = p.grad
        if self.stream is None:  # already on the CPU: the gradient itself, which the model lets go of below
            self._pending.setdefault(p, []).append((grad.detach(), None))
        else:
            copy = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(self.stream):
                copy.copy_(grad, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            grad.record_stream(self.stream)  # the allocator must not reuse it before the copy ends
            self._pending.setdefault(p, []).append((copy, done))
        p.grad = None

    def _gather_grads(self) -> list[Tensor]:
        """Move the copied gradients into the masters' .grad (FP32, summed over micro-steps); returns the
        masters that have one."""
        for p, copies in self._pending.items():
            master = self.masters[p]
            for i, (copy, done) in enumerate(copies):
                if done is not None:
                    done.synchronize()
                if i == 0:
                    master.grad = copy.float()  # the copy itself when it is FP32: nothing else holds it
                else:
                    master.grad.add_(copy)
        self._pending.clear()
        return [m for m in self.masters.values() if m.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the offloaded gradients; returns the total norm."""
        return torch.nn.utils.clip_grad_norm_(self._gather_grads(), max_norm)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CPUOffloadOptimizer.step takes no closure")
        self._gather_grads()
        self.inner.step()
        self._copy_masters_to_params()

    def _copy_masters_to_params(self) -> None:
        if self.stream is None:
            for p in self.params:
                p.copy_(self.masters[p])
            return
        self.stream.synchronize()  # the last step's copies out of the staging buffers are done
        for p in self.params:
            staging = self._staging[p]
            staging.copy_(self.masters[p])
            with torch.cuda.stream(self.stream):
                p.copy_(staging, non_blocking=True)
        torch.cuda.current_stream(self.params[0].device).wait_stream(self.stream)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending.clear()
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.inner.state_dict(), "masters": [self.masters[p] for p in self.params]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the states and the FP32 masters, and the GPU weights from them."""
        masters = state_dict["masters"]
        if len(masters) != len(self.params):
            raise ValueError(f"the saved state holds {len(masters)} master weights, this optimizer "
                             f"{len(self.params)}")
        for p, saved in zip(self.params, masters):
            self.masters[p].copy_(saved)
        self.inner.load_state_dict(state_dict["optimizer"])
        self.param_groups, self.state = self.inner.param_groups, self.inner.state  # loading made new ones
        with torch.no_grad():
            self._copy_masters_to_params()


def _offload_grad_if_alive(optimizer: weakref.ref, p: Tensor) -> None:
    if (alive := optimizer()) is not None:
        alive._offload_grad(p)
