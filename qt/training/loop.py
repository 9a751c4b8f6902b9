"""The training loop: model, optimizer, an iterator of micro-batches and a loss function in; metrics
and checkpoints out. Nothing here is specific to language models.

The host waits for the device only at sync points: log steps, evaluations, checkpoints and the last step (one
transfer of everything the loop tracks, `RunningStats`). In between, the loss and the gradient norm stay on the
device, and whether a step may update the weights is decided there: see `RunningStats` for the rules that stop
a run that diverged, and `StopRequest` for Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.tensor import DTensor

from qt.sqnr import forward_sqnr
from qt.subclass import prepare_all_gathers
from qt.training.checkpoint import Checkpointer, RunDirLock, refuse_existing_run
from qt.training.config import RETUNABLE_ON_RESUME, TrainingError, save_config
from qt.training.distributed import Dist, all_reduce_sum, autocast, barrier, gradient_sync, unwrap
from qt.training.metrics import MetricsLogger, peak_flops, read_metrics
from qt.training.optimizer import lr_at

# A run has blown up when its loss stays, for BLOWN_UP_STEPS steps in a row, above BLOWN_UP_AT of the way back from
# its best to where it started, once it has made progress: "where it started" is the mean loss of the first
# START_STEPS steps, "best" the lowest value of the loss's moving average (decay LOSS_EMA_DECAY, ~10 steps), and
# progress means a best below ARMED_BELOW times the start. The averages keep one lucky or unlucky batch from
# moving the threshold, the streak keeps a few bad batches from tripping it.
BLOWN_UP_STEPS = 5
BLOWN_UP_AT = 0.9
ARMED_BELOW = 0.9
START_STEPS = 10
LOSS_EMA_DECAY = 0.9


class TrainingDiverged(TrainingError):
    pass


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step, saving a checkpoint first.
    A second Ctrl-C interrupts at once. Under torchrun the ranks agree on it after every step over a CPU (gloo)
    group: the request is acted on at the end of the step in which it arrives, and asking never waits for a GPU."""

    def __init__(self, world_size: int):
        self.requested = False
        self.group = torch_dist.new_group(backend="gloo") if world_size > 1 else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was asked to stop."""
        if self.group is None:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        torch_dist.all_reduce(flag, group=self.group)
        return flag.item() > 0

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class GarbageCollection:
    """Python's garbage collection while training: automatic collection off and the young generations collected
    every `interval` steps instead, as torchtitan does; `interval` 0 leaves automatic collection on. A collection
    stops the host for a while; under torchrun one that comes at different times on different ranks holds every
    rank up at the next collective (FP8 on 4 GPUs: its slowest 5-step interval at 49% of the median with automatic
    collection, 97% without; docs/scaling.md, round 12)."""

    def __init__(self, interval: int):
        self.interval, self.was_enabled = interval, gc.isenabled()
        if interval:
            gc.disable()
            gc.collect(1)

    def step_done(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect(1)

    def restore(self) -> None:
        if self.interval and self.was_enabled:
            gc.enable()


class RunningStats:
    """What the loop tracks between sync points, on the device: read with one transfer (`read`).

    Non-finite: a step whose loss (on any rank) or gradient norm is not finite sets `found_inf`, and it stays
    set. torch's fused optimizers (`_step_supports_amp_scaling`: fused Adam, AdamW, SGD, Adagrad) skip their
    update, weights and states, while it is set: the mechanism GradScaler uses. For any other optimizer the loop
    reads `found_inf` before each step (one host sync a step). Either way the first non-finite step never
    touches the weights and the run stops at the next sync point, naming it and the last good checkpoint.

    Blown up (see BLOWN_UP_STEPS): `streak` counts the consecutive steps whose loss is above `threshold`. A
    checkpoint is written only while the streak is 0: one that falls due during a streak waits for it to end,
    and the run stops when the streak reaches BLOWN_UP_STEPS, or when it cannot wait (last step, stop request).
    A checkpoint keeps `loss_sum` and the `RULE_STATE` slots."""

    SLOTS = ("loss_sum", "tokens", "grad_norm", "found_inf", "bad_step", "bad_loss", "bad_grad_norm", "streak",
             "start_sum", "loss_ema", "best_ema", "threshold")
    BAD = slice(SLOTS.index("bad_step"), SLOTS.index("bad_grad_norm") + 1)  # the first non-finite step's values
    RULE_STATE = ("streak", "start_sum", "loss_ema", "best_ema", "threshold")

    def __init__(self, device: torch.device, world_size: int, saved: dict | None = None):
        self.values = torch.zeros(len(self.SLOTS), dtype=torch.float64, device=device)
        self.slot = {name: self.values[i] for i, name in enumerate(self.SLOTS)}
        for name, value in {"best_ema": math.inf, "threshold": math.inf, **(saved or {})}.items():
            self.slot[name].fill_(value)
        self.found_inf = torch.zeros((), device=device)  # float32, as fused optimizers read it
        self.world_size = world_size

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int) -> None:
        """Fold in one step (device work only): `loss` this rank's, `grad_norm` global, `tokens` this rank's."""
        s = self.slot
        local = torch.stack([loss.double() / self.world_size, (~torch.isfinite(loss)).double(),
                             torch.full_like(s["tokens"], tokens)])
        step_loss, loss_nonfinite, step_tokens = all_reduce_sum(local)
        grad_norm = grad_norm.to(self.values.device, torch.float64)  # CPU offload clips on the CPU
        nonfinite = (loss_nonfinite > 0) | ~torch.isfinite(grad_norm)
        first_bad = nonfinite & (self.found_inf == 0)
        bad = torch.stack([torch.full_like(step_loss, step), step_loss, grad_norm])
        self.values[self.BAD].copy_(torch.where(first_bad, bad, self.values[self.BAD]))
        self.found_inf.copy_(torch.maximum(self.found_inf, nonfinite.float()))
        s["loss_sum"].add_(step_loss)
        s["tokens"].add_(step_tokens)
        s["grad_norm"].copy_(grad_norm)
        self._blown_up_rule(step, step_loss)

    def _blown_up_rule(self, step: int, step_loss: torch.Tensor) -> None:
        s = self.slot
        if step <= START_STEPS:
            s["start_sum"].add_(step_loss)
        s["loss_ema"].copy_(step_loss if step == 1 else torch.lerp(step_loss, s["loss_ema"], LOSS_EMA_DECAY))
        if step >= START_STEPS:
            s["best_ema"].copy_(torch.minimum(s["best_ema"], s["loss_ema"]))
            start, best = s["start_sum"] / START_STEPS, s["best_ema"]
            armed = (start > 0) & (best <= ARMED_BELOW * start)
            s["threshold"].copy_(torch.where(armed, torch.lerp(best, start, BLOWN_UP_AT), math.inf))
        s["streak"].copy_(torch.where(step_loss > s["threshold"], s["streak"] + 1, 0))

    def read(self) -> dict:
        """Every slot on the host: the one sync of a sync point."""
        self.slot["found_inf"].copy_(self.found_inf)
        return dict(zip(self.SLOTS, self.values.tolist()))

    def found_nonfinite(self) -> bool:
        """The host check of optimizers that cannot skip a step on the device (one sync)."""
        return bool(self.found_inf.item())

    def start_log_interval(self) -> None:
        self.slot["loss_sum"].zero_()


@torch.no_grad()
def mean_loss(model, batches, loss_fn, device: torch.device) -> float:
    """Mean of loss_fn over every rank's batches."""
    total = torch.zeros(2, device=device)
    for batch in batches:
        total += torch.stack([loss_fn(model, batch).float(), torch.ones((), device=device)])
    all_reduce_sum(total)
    return (total[0] / total[1]).item()


def clip_gradients(model, optimizer, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it (a plain tensor, the same on every rank). An optimizer that moves
    gradients off the model (CPU offload) clips where they are.

    FSDP2's gradients are DTensors sharded over a 1-D mesh: the norm is then taken from their local shards (the
    root of the sum over ranks of each shard's sum of squares, one all-reduce) and they are scaled in place, as
    torch's clip_grad_norm_ does but without DTensor's dispatch for every gradient. In the gaps it left, FP8's GPUs sat
    idle for about 6 ms of each profiled step on 4 GPUs (docs/scaling.md, round 12; not re-timed since)."""
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    group = _shard_group(grads)
    if group is None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    shards = [grad._local_tensor for grad in grads]  # to_local() would go through autograd, once a gradient
    squares = torch.stack(torch._foreach_norm(shards, dtype=torch.float32)).square().sum()
    torch_dist.all_reduce(squares, group=group)
    norm = squares.sqrt()
    torch._foreach_mul_(shards, (max_norm / (norm + 1e-6)).clamp(max=1.0))  # torch's clip_grad_norm_ coefficient
    return norm


def _shard_group(grads: list) -> torch_dist.ProcessGroup | None:
    """The process group `grads` are sharded over where every one is a DTensor sharded on the same 1-D mesh (as
    FSDP2 leaves them); else None."""
    if not grads or not all(isinstance(grad, DTensor) for grad in grads):
        return None
    mesh = grads[0].device_mesh
    if mesh.ndim != 1 or any(grad.device_mesh != mesh or not grad.placements[0].is_shard() for grad in grads):
        return None
    return mesh.get_group()


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
    run_dir = Path(cfg.run_dir)
    with RunDirLock(run_dir, dist_info):
        checkpointer = Checkpointer(run_dir, dist_info, sharded=dist_info.world_size > 1 and not cfg.ddp,
                                    keep=cfg.keep_checkpoints, asynchronous=cfg.async_checkpoint)
        try:
            return _train(checkpointer, model=model, optimizer=optimizer, batches=batches, loss_fn=loss_fn, cfg=cfg,
                          dist_info=dist_info, tokens_per_step=tokens_per_step, count_tokens=count_tokens, unit=unit,
                          eval_batches=eval_batches, evaluate=evaluate, flops_per_token=flops_per_token,
                          weight_dtype=weight_dtype, compute_dtype=compute_dtype)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise TrainingError(f"no space left on device writing {e.filename or run_dir}; the last checkpoint is "
                                f"{checkpointer.last_good or 'none'}: free space and continue with --resume") from None


def _train(checkpointer: Checkpointer, *, model, optimizer, batches, loss_fn, cfg, dist_info, tokens_per_step,
           count_tokens, unit, eval_batches, evaluate, flops_per_token, weight_dtype, compute_dtype) -> dict:
    device, run_dir = dist_info.device, Path(cfg.run_dir)
    if not cfg.resume:
        refuse_existing_run(run_dir)
    continuing = (run_dir / "config.yaml").is_file()
    barrier()  # every rank has looked before rank 0 writes config.yaml: a slower one would take it for another run
    restored = checkpointer.load(model, optimizer) if cfg.resume else None
    step, extra = (restored.step, restored.extra) if restored else (0, {})
    if restored:  # also for a finished run: the scripts tell it from a stopped one by the batches drawn
        batches.load_state_dict(extra["batches"])
    if step >= cfg.n_steps:
        if dist_info.is_main:
            print(f"{run_dir} is already complete: its checkpoint {restored.path.name} is at step {step} of "
                  f"{cfg.n_steps}; nothing to train", flush=True)
        records = read_metrics(run_dir / "metrics.jsonl")
        return records[-1] if records else {}
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    tokens_seen, interval_steps = extra.get("tokens_seen", 0), extra.get("interval_steps", 0)
    stats = RunningStats(device, dist_info.world_size, saved=extra.get("running_stats"))
    skips_on_device = getattr(optimizer, "_step_supports_amp_scaling", False)
    if skips_on_device:
        optimizer.found_inf = stats.found_inf
    logger = MetricsLogger(cfg, dist_info, start_step=step)
    if restored:
        logger.message(f"resumed from {restored.path} at step {step}" + _retuned(cfg, restored.config)
                       + _resharded(restored.world_size, dist_info.world_size))
    elif continuing:
        logger.message(f"{run_dir} has no checkpoint yet (its earlier run stopped before saving one); "
                       f"starting at step 0")
    first_record = _forward_sqnr(model, compute_dtype, logger, run_dir) if dist_info.is_main else {}
    peak = peak_flops(device)
    stop = StopRequest(dist_info.world_size)
    profiler = _profiler(run_dir, dist_info, device) if cfg.profile else None
    watch_syncs = cfg.sync_debug and device.type == "cuda"
    prepare_all_gathers(model)  # of the weights as built or restored
    record, save_waiting, tokens_read = {}, False, 0.0
    model.train()
    interval_start, interval_tokens = time.perf_counter(), 0
    collection = GarbageCollection(cfg.gc_interval)

    def diverged(what: str) -> TrainingDiverged:
        checkpointer.wait(quietly=True)  # the save in flight, if any, is the last good checkpoint
        latest = checkpointer.last_good or checkpointer.latest()
        return TrainingDiverged(f"{what}. Last good checkpoint: {latest or 'none'}; try a lower --lr (or "
                                f"--clip_grad_norm, more --warmup_steps) or another recipe"
                                + (", and --resume to continue from it" if latest else ""))

    def nonfinite_error(host: dict) -> TrainingDiverged:
        return diverged(f"loss {host['bad_loss']} (gradient norm {host['bad_grad_norm']}) at step "
                        f"{int(host['bad_step'])}; stopped before updating the weights")

    try:
        while step < cfg.n_steps:
            step += 1
            if watch_syncs and step > 2:
                torch.cuda.set_sync_debug_mode("warn")
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
            # Counted tokens are summed over ranks; a fixed count is the global one, given by rank 0.
            stats.observe(step, loss, grad_norm, step_tokens if count_tokens else
                          tokens_per_step if dist_info.is_main else 0)
            if not skips_on_device and stats.found_nonfinite():
                raise nonfinite_error(stats.read())
            optimizer.step()
            prepare_all_gathers(model)
            optimizer.zero_grad(set_to_none=True)
            interval_steps += 1
            logger.step_done()
            collection.step_done(step)
            if profiler:
                profiler.step()

            stop_requested, last = stop.agreed(), step == cfg.n_steps
            log_due = step % cfg.log_interval == 0 or last or stop_requested
            eval_due = bool(eval_batches or evaluate) and ((cfg.eval_interval and step % cfg.eval_interval == 0)
                                                           or last)
            save_due = cfg.save_checkpoints and ((cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last
                                                 or stop_requested or save_waiting)
            record = {}
            if not (log_due or eval_due or save_due):
                continue
            if watch_syncs:
                torch.cuda.set_sync_debug_mode("default")  # a step that logs reads the device on purpose
            waited_from = time.perf_counter()
            host = stats.read()
            if host["found_inf"]:
                raise nonfinite_error(host)
            if host["streak"] >= BLOWN_UP_STEPS or (host["streak"] and save_due and (last or stop_requested)):
                raise diverged(f"the loss has stayed above {host['threshold']:.4g} for the last "
                               f"{int(host['streak'])} steps (step {step}): back near where it started (mean of the "
                               f"first {START_STEPS} steps {host['start_sum'] / START_STEPS:.4g}) after reaching "
                               f"{host['best_ema']:.4g} (moving average), the run has blown up")
            new_tokens = host["tokens"] - tokens_read
            tokens_read = host["tokens"]
            tokens_seen += int(new_tokens)
            interval_tokens += int(new_tokens)
            if log_due:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                # How far the host had run ahead of the device: near 0, the host set the pace of the steps.
                host_wait_ms = 1e3 * (time.perf_counter() - waited_from)
                tokens_per_second = interval_tokens / (time.perf_counter() - interval_start)
                record.update(loss=host["loss_sum"] / interval_steps, lr=lr, grad_norm=host["grad_norm"],
                              **{f"{unit}_per_second": tokens_per_second},
                              mfu=(flops_per_token * tokens_per_second / (peak * dist_info.world_size)
                                   if peak and flops_per_token else None),
                              max_memory_allocated_gb=(torch.cuda.max_memory_allocated(device) / 1e9
                                                       if device.type == "cuda" else None),
                              host_wait_ms=host_wait_ms)
                stats.start_log_interval()
                interval_steps = 0
            if eval_due:
                model.eval()
                with autocast(device, weight_dtype, compute_dtype):
                    record.update(evaluate(model) if evaluate else
                                  {"val_loss": mean_loss(model, eval_batches, loss_fn, device)})
                model.train()
            if record:
                record = {"step": step, f"{unit}_seen": tokens_seen, **record, **first_record}
                first_record = {}
                logger.log(record)
            save_waiting = save_due and host["streak"] > 0
            if save_due and not save_waiting:
                checkpointer.save(step, model, optimizer, {
                    "batches": batches.state_dict(), "tokens_seen": tokens_seen, "interval_steps": interval_steps,
                    "running_stats": {"loss_sum": 0.0 if log_due else host["loss_sum"],
                                      **{k: host[k] for k in RunningStats.RULE_STATE}}},
                    config=dataclasses.asdict(cfg))
            if stop_requested:
                checkpointer.wait()
                logger.message(f"stopped at step {step}" + (f"; continue with --resume --run_dir {cfg.run_dir}"
                                                            if cfg.save_checkpoints else ""))
                break
            if record or (save_due and not save_waiting):  # time spent logging, evaluating, saving is not training
                interval_start, interval_tokens = time.perf_counter(), 0
        checkpointer.wait()
    except BaseException:
        checkpointer.wait(quietly=True)  # publish the save in flight; the error on its way out says what went wrong
        raise
    finally:
        if watch_syncs:
            torch.cuda.set_sync_debug_mode("default")
        stop.restore()
        collection.restore()
        if profiler:
            profiler.stop()
        logger.close()
    return record


def _resharded(saved: int, now: int) -> str:
    if saved == now:
        return ""
    return (f"; it was written by {saved} processes, loaded here on {now}: the run goes on from the same weights, "
            f"optimizer states and data position, with other random draws (stochastic rounding, dropout)")


def _forward_sqnr(model, compute_dtype: torch.dtype, logger: MetricsLogger, run_dir: Path) -> dict:
    """Logs the forward SQNR of the model's quantized linear (qt.sqnr: a run that silently stopped quantizing
    shows it); returns it as metrics for the run's first record, or nothing where an earlier session of the
    run logged records already."""
    sqnr = forward_sqnr(unwrap(model), compute_dtype)
    if sqnr is None:
        return {}
    logger.message(str(sqnr))
    return {} if read_metrics(run_dir / "metrics.jsonl") else {"forward_sqnr_db": round(sqnr.db, 2)}


def _retuned(cfg, trained_with: dict | None) -> str:
    """A note of the optimisation settings this resume changes (RETUNABLE_ON_RESUME), if any."""
    changes = [f"{k} {trained_with[k]!r} -> {getattr(cfg, k)!r}" for k in RETUNABLE_ON_RESUME
               if trained_with and k in trained_with and trained_with[k] != getattr(cfg, k)]
    return f"; with changed settings: {', '.join(changes)} (the run goes on differently from here)" if changes else ""


# The profiled steps: after a step to skip and two to warm the profiler up, three recorded (what
# scripts/trace_summary.py's --steps assumes by default).
PROFILED_STEPS = {"wait": 1, "warmup": 2, "active": 3}


class StepProfiler:
    """`profiler` stepped with the training loop. Until its schedule is over, each step ends with the device's work
    done: the host runs ahead of a GPU, so otherwise the kernels of the last warmup step run inside the recorded
    window and those of the last recorded step after it (a window of "three steps" held 3.0-3.8 steps' attention
    kernels on an H200), and a trace's per-step figures would be off by as much, unevenly between runs."""

    def __init__(self, profiler, device: torch.device):
        self.profiler, self.device, self.steps = profiler, device, 0

    def step(self) -> None:
        if self.device.type == "cuda" and self.steps < sum(PROFILED_STEPS.values()):
            torch.cuda.synchronize(self.device)
        self.steps += 1
        self.profiler.step()

    def stop(self) -> None:
        self.profiler.stop()


def _profiler(run_dir: Path, dist_info: Dist, device: torch.device) -> StepProfiler:
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
                                      schedule=torch.profiler.schedule(**PROFILED_STEPS, repeat=1),
                                      on_trace_ready=write)
    profiler.start()
    return StepProfiler(profiler, device)
