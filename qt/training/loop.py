"""The training loop: model, optimizer, an iterator of micro-batches and a loss function in; metrics
and checkpoints out. Nothing here is specific to language models."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from qt.training.checkpoint import Checkpointer
from qt.training.config import TrainingError, save_config
from qt.training.distributed import Dist, all_reduce_sum, autocast, gradient_sync
from qt.training.metrics import MetricsLogger, peak_flops
from qt.training.optimizer import lr_at


class TrainingDiverged(TrainingError):
    pass


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step, saving a checkpoint first.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def mean_loss(model, batches, loss_fn, device: torch.device) -> float:
    """Mean of loss_fn over every rank's batches."""
    total = torch.zeros(2, device=device)
    for batch in batches:
        total += torch.stack([loss_fn(model, batch).float(), torch.ones((), device=device)])
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def clip_gradients(model, optimizer, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it. An optimizer that moves gradients off the model (CPU
    offload) clips where they are."""
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train(*, model, optimizer, batches, loss_fn, cfg, dist_info: Dist, tokens_per_step: int | None = None,
          count_tokens=None, unit: str = "tokens", eval_batches=None, evaluate=None,
          flops_per_token: float | None = None, weight_dtype=torch.float32, compute_dtype=torch.float32) -> dict:
    """Train `model` for cfg.n_steps optimizer steps, resuming from RUN_DIR's last checkpoint with
    cfg.resume. Each step draws cfg.grad_accum micro-batches from `batches` (an iterator with
    state_dict/load_state_dict) and minimizes loss_fn(model, batch). Returns the last metrics record.

    Throughput counts `tokens_per_step` a step or, where batches vary (padding), count_tokens(batch) per
    micro-batch summed over ranks; metrics name the counted items `unit` ({unit}_seen, {unit}_per_second).
    Evaluation logs val_loss over `eval_batches`, or the metrics dict that evaluate(model) returns."""
    if (tokens_per_step is None) == (count_tokens is None):
        raise ValueError("train() takes tokens_per_step or count_tokens, not both")
    device = dist_info.device
    if dist_info.is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    checkpointer = Checkpointer(Path(cfg.run_dir), dist_info, sharded=dist_info.world_size > 1 and not cfg.ddp,
                                keep=cfg.keep_checkpoints)
    step, tokens_seen, interval_losses = 0, 0, []
    if cfg.resume and checkpointer.latest():
        step, extra = checkpointer.load(model, optimizer)
        batches.load_state_dict(extra["batches"])
        tokens_seen, interval_losses = extra["tokens_seen"], extra["interval_losses"]
    saved_step = step  # the last step with a checkpoint
    logger = MetricsLogger(cfg, dist_info, start_step=step)
    if step:
        logger.message(f"resumed from {checkpointer.latest()}")
    elif cfg.resume:
        logger.message(f"--resume: {cfg.run_dir} has no checkpoint yet; starting at step 0")
    peak = peak_flops(device)
    stop = StopRequest()
    profiler = _profiler(Path(cfg.run_dir), dist_info, device) if cfg.profile else None
    record = {}
    model.train()
    interval_start, interval_tokens = time.perf_counter(), 0
    try:
        while step < cfg.n_steps:
            step += 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = torch.zeros((), device=device)
            step_tokens = 0
            for micro_step in range(cfg.grad_accum):
                batch = next(batches)
                with gradient_sync(model, micro_step == cfg.grad_accum - 1), autocast(device, weight_dtype,
                                                                                       compute_dtype):
                    micro_loss = loss_fn(model, batch) / cfg.grad_accum
                micro_loss.backward()
                loss += micro_loss.detach()
                step_tokens += count_tokens(batch) if count_tokens else 0
            grad_norm = clip_gradients(model, optimizer, cfg.clip_grad_norm or math.inf)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            # One collective and one host sync a step: the loss (all ranks), whether any rank must stop, and
            # the tokens counted on every rank (float64: exact integers far beyond any batch).
            reduced = all_reduce_sum(torch.cat([loss.double().view(1) / dist_info.world_size,
                                                torch.tensor([float(stop.requested), step_tokens],
                                                             dtype=torch.float64, device=device)]))
            loss_value, stop_requested, grad_norm = reduced[0].item(), reduced[1].item() > 0, grad_norm.item()
            step_tokens = int(reduced[2].item()) if count_tokens else tokens_per_step
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                latest = checkpointer.latest()
                raise TrainingDiverged(
                    f"loss {loss_value} (gradient norm {grad_norm}) at step {step}; stopped before updating the "
                    f"weights. Last good checkpoint: {latest or 'none'}; try a lower --lr or another recipe"
                    + (", and --resume to continue from it" if latest else ""))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += step_tokens
            interval_losses.append(loss_value)
            interval_tokens += step_tokens
            logger.step_done()
            if profiler:
                profiler.step()

            last = step == cfg.n_steps
            record = {}
            if step % cfg.log_interval == 0 or last or stop_requested:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tokens_per_second = interval_tokens / (time.perf_counter() - interval_start)
                record.update(loss=sum(interval_losses) / len(interval_losses), lr=lr, grad_norm=grad_norm,
                              **{f"{unit}_per_second": tokens_per_second},
                              mfu=(flops_per_token * tokens_per_second / (peak * dist_info.world_size)
                                   if peak and flops_per_token else None),
                              max_memory_allocated_gb=(torch.cuda.max_memory_allocated(device) / 1e9
                                                       if device.type == "cuda" else None))
                interval_losses = []
            if (eval_batches or evaluate) and ((cfg.eval_interval and step % cfg.eval_interval == 0) or last):
                model.eval()
                with autocast(device, weight_dtype, compute_dtype):
                    record.update(evaluate(model) if evaluate else
                                  {"val_loss": mean_loss(model, eval_batches, loss_fn, device)})
                model.train()
            if record:
                logger.log({"step": step, f"{unit}_seen": tokens_seen, **record})
            if cfg.save_checkpoints and ((cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last
                                         or stop_requested):
                saved_step = step
                checkpointer.save(step, model, optimizer, {"batches": batches.state_dict(), "tokens_seen": tokens_seen,
                                                           "interval_losses": interval_losses})
            if stop_requested:
                logger.message(f"stopped at step {step}" + (f"; continue with --resume --run_dir {cfg.run_dir}"
                                                            if cfg.save_checkpoints else ""))
                break
            if record or saved_step == step:  # time spent logging, evaluating, saving is not training time
                interval_start, interval_tokens = time.perf_counter(), 0
    finally:
        stop.restore()
        if profiler:
            profiler.stop()
        logger.close()
    return record


def _profiler(run_dir: Path, dist_info: Dist, device: torch.device):
    """A Chrome trace of three steps after two warmup steps in RUN_DIR/profile/, and beside it a table of
    the ops that took the most time (self time, on the GPU where there is one, and on the host)."""
    trace = run_dir / "profile" / f"trace_rank{dist_info.rank}.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def write(profile):
        profile.export_chrome_trace(str(trace))
        averages = profile.key_averages()
        tables = [averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
                  for key in (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]]
        trace.with_name(f"top_ops_rank{dist_info.rank}.txt").write_text("\n\n".join(tables))

    profiler = torch.profiler.profile(activities=activities,
                                      schedule=torch.profiler.schedule(wait=1, warmup=2, active=3, repeat=1),
                                      on_trace_ready=write)
    profiler.start()
    return profiler
