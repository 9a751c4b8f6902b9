"""Peak GPU memory and step time of a ~1B Llama under qt's recipes and low-bit optimizers.

    python scripts/bench_memory.py --out $OUT                      # memory + step time (~5 min on an H100)
    python scripts/bench_memory.py --out $OUT --data DIR          # + loss after --loss_steps on DIR/*.bin
    python scripts/bench_memory.py --out /tmp/smoke --model tiny --device cpu --steps 1   # CPU smoke run

TinyLlama-1.1B shape (random init), sequence 2048, activation checkpointing, batch 1 and 4. Each
row builds its model afresh; a row that fails (e.g. out of memory) records the error and the
run goes on. Results are rewritten to OUT/bench_memory.{md,json} after every row, so a run cut
off by its time limit still leaves everything measured so far; rows that would start after
--time_budget_s are skipped and listed as such.

Rows: the usual mixed precision (FP32 weights, BF16 autocast, fused torch AdamW: 16 bytes a
parameter), pure BF16 + fused torch AdamW (BF16 states), BF16 / int8_weight_only weights with
qt's AdamW8bit / AdamW4bit, BF16 weights with qt's CPUOffloadOptimizer (FP32 masters and AdamW on the
CPU), and torchao's AdamW8bit / AdamW4bit on BF16 weights when torchao imports (skipped with a note
otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import qt  # noqa: E402
import qt.optim  # noqa: E402
from qt.training.loop import clip_gradients  # noqa: E402

GIB = 2**30
MODEL_SHAPES = {
    # TinyLlama-1.1B.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # For CPU smoke runs of this script.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}


def _torchao_optimizers():
    """torchao's (AdamW8bit, AdamW4bit), or None where torchao is not installed."""
    for module in ("torchao.optim", "torchao.prototype.low_bit_optim"):
        with contextlib.suppress(ImportError):
            imported = __import__(module, fromlist=["AdamW8bit", "AdamW4bit"])
            return imported.AdamW8bit, imported.AdamW4bit
    return None


@dataclass
class Setup:
    """One row: how the weights are held and which optimizer steps them."""

    name: str
    weights: str  # "fp32" (BF16 autocast), "bf16", or a qt recipe applied to BF16 weights
    make_optimizer: Callable[..., torch.optim.Optimizer] | None  # (params, lr, **compile_kwargs)
    note: str = ""
    compiles_qt_step: bool = False  # a qt optimizer: retried with an eager step if compiling fails


def _setups() -> list[Setup]:
    # Fused torch AdamW: foreach would add temporaries the size of all states to the peak.
    fused_adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, fused=True)  # noqa: E731
    qt_8bit = lambda params, lr, **kw: qt.optim.AdamW8bit(params, lr=lr, bf16_stochastic_round=True, **kw)  # noqa: E731
    qt_4bit = lambda params, lr, **kw: qt.optim.AdamW4bit(params, lr=lr, bf16_stochastic_round=True, **kw)  # noqa: E731
    setups = [
        Setup("mixed precision (FP32 weights, BF16 autocast) + torch AdamW", "fp32", fused_adamw),
        Setup("pure BF16 + torch AdamW (BF16 states)", "bf16", fused_adamw),
        Setup("int8_weight_only + qt AdamW8bit", "int8_weight_only", qt_8bit, compiles_qt_step=True),
        Setup("int8_weight_only + qt AdamW4bit", "int8_weight_only", qt_4bit, compiles_qt_step=True),
        Setup("pure BF16 + qt AdamW8bit (stochastic rounding)", "bf16", qt_8bit, compiles_qt_step=True),
        Setup("pure BF16 + qt AdamW4bit (stochastic rounding)", "bf16", qt_4bit, compiles_qt_step=True),
    ]
    torchao = _torchao_optimizers()
    for bits, index in (("8bit", 0), ("4bit", 1)):
        name = f"pure BF16 + torchao AdamW{bits} (stochastic rounding)"
        if torchao is None:
            setups.append(Setup(name, "bf16", None, note="skipped: torchao is not installed"))
        else:
            cls = torchao[index]
            setups.append(Setup(name, "bf16", lambda params, lr, cls=cls: cls(params, lr=lr, bf16_stochastic_round=True)))
    setups.append(Setup("BF16 weights + CPU-offloaded torch AdamW (FP32 master weights and states on the CPU)", "bf16",
                        lambda params, lr: qt.optim.CPUOffloadOptimizer(params, lr=lr)))
    return setups


def _build_model(shape: str, weights: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.float32 if weights == "fp32" else torch.bfloat16)
    if weights not in ("fp32", "bf16"):
        qt.quantize_(model, weights, min_shape=None)  # the memory of every linear's recipe, small ones too
    # Every decoder layer; transformers 5 renamed gradient_checkpointing_enable.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


class TokenBatches:
    """Random windows of --data's uint16 token shards, or uniformly random tokens without it."""

    def __init__(self, data_dir: str | None, vocab_size: int, batch: int, seq_len: int, device: torch.device):
        self.shards = []
        if data_dir is not None:
            paths = sorted(glob.glob(os.path.join(data_dir, "*.bin")))
            if not paths:
                raise SystemExit(f"--data {data_dir}: no *.bin token shards there; pass a folder of uint16 .bin files")
            self.shards = [np.memmap(path, dtype=np.uint16, mode="r") for path in paths]
        self.vocab_size, self.batch, self.seq_len, self.device = vocab_size, batch, seq_len, device
        self.generator = np.random.default_rng(0)

    def next(self) -> torch.Tensor:
        if not self.shards:
            tokens = self.generator.integers(0, self.vocab_size, (self.batch, self.seq_len))
        else:
            rows = []
            for _ in range(self.batch):
                shard = self.shards[self.generator.integers(len(self.shards))]
                start = self.generator.integers(0, len(shard) - self.seq_len)
                rows.append(np.asarray(shard[start : start + self.seq_len], dtype=np.int64))
            tokens = np.stack(rows)
        tokens = torch.from_numpy(tokens).clamp_(max=self.vocab_size - 1)
        return tokens.to(self.device, non_blocking=True)


def _train_step(model, optimizer, input_ids, autocast: bool) -> float:
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    clip_gradients(model, optimizer, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_setup(setup: Setup, args, batch: int, steps: int, data_dir: str | None) -> dict:
    """`_run_setup`, retried with qt's eager optimizer step if the compiled one fails, so that one
    compile problem on the device does not cost the run its memory numbers."""
    row = _run_setup(setup, args, batch, steps, data_dir, {})
    if "error" in row and setup.compiles_qt_step:
        failure = row["error"]
        row = _run_setup(setup, args, batch, steps, data_dir, {"compile_step": False})
        row["note"] = f"eager optimizer step: the compiled one failed ({failure})"
    return row


def _run_setup(setup: Setup, args, batch: int, steps: int, data_dir: str | None, optimizer_kwargs: dict) -> dict:
    """Builds, warms up (state init, compiles) and times `steps` steps; peak memory of those steps."""
    device = torch.device(args.device)
    row = dict(setup=setup.name, batch=batch, seq_len=args.seq_len)
    model = optimizer = None
    try:
        _free(device)
        model = _build_model(args.model, setup.weights, device)
        params = [p for p in model.parameters() if p.requires_grad]
        row["params_billion"] = sum(p.numel() for p in params) / 1e9
        optimizer = setup.make_optimizer(params, args.lr, **optimizer_kwargs)
        data = TokenBatches(data_dir, model.config.vocab_size, batch, args.seq_len, device)
        autocast = setup.weights == "fp32"
        for _ in range(args.warmup):
            _train_step(model, optimizer, data.next(), autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            losses.append(_train_step(model, optimizer, data.next(), autocast))
        losses = [float(loss) for loss in losses]  # synchronizes
        row["step_s"] = (time.perf_counter() - start) / steps
        if not all(math.isfinite(loss) for loss in losses):
            raise RuntimeError(f"non-finite loss: {losses}")
        row["final_loss"] = sum(losses[-20:]) / len(losses[-20:])
        if device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    except Exception as error:  # noqa: BLE001 - one failing row must not lose the others
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        traceback.print_exc()
    finally:
        del model, optimizer
        _free(device)
    return row


def _targets(rows: list[dict]) -> list[str]:
    """The issue's memory targets at batch 1, checked against this run's numbers."""
    peak = {r["setup"]: r.get("peak_allocated_gib") for r in rows if r["batch"] == 1 and "loss_steps" not in r}
    int8 = peak.get("int8_weight_only + qt AdamW8bit")
    lines = []
    for reference, limit in (("mixed precision (FP32 weights, BF16 autocast) + torch AdamW", 0.45), ("pure BF16 + torch AdamW (BF16 states)", 0.75)):
        if int8 is None or peak.get(reference) is None:
            lines.append(f"- int8_weight_only + AdamW8bit <= {limit:.0%} of '{reference}': not measured")
        else:
            ratio = int8 / peak[reference]
            verdict = "PASS" if ratio <= limit else "FAIL"
            lines.append(f"- {verdict}: int8_weight_only + AdamW8bit peak is {ratio:.1%} of '{reference}' (target <= {limit:.0%})")
    return lines


def _write(rows: list[dict], args, out_dir: str, started: float) -> None:
    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "-"

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else args.device
    lines = [
        f"# Peak memory and step time: {args.model} shape, seq {args.seq_len}, activation checkpointing",
        "",
        f"Device: {device}; torch {torch.__version__}. Command: `python {' '.join(sys.argv)}`.",
        f"Peak = torch.cuda.max_memory_allocated over {args.steps} steps after {args.warmup} warm-up steps "
        "(states allocated, optimizer step compiled). Gradient clipping at 1.0 before every step.",
        "",
        "| setup | batch | peak allocated (GiB) | peak reserved (GiB) | step (s) | loss (mean of last steps) | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        label = row["setup"] + (f" [{row['loss_steps']} steps on --data]" if "loss_steps" in row else "")
        note = "; ".join(row[key] for key in ("note", "error") if row.get(key))
        lines.append(
            f"| {label} | {row['batch']} | {cell(row, 'peak_allocated_gib', '{:.2f}')} | {cell(row, 'peak_reserved_gib', '{:.2f}')} "
            f"| {cell(row, 'step_s', '{:.3f}')} | {cell(row, 'final_loss', '{:.3f}')} | {note} |"
        )
    lines += ["", "Targets (issue 4, batch 1):", *_targets(rows), "", f"Wall time: {time.time() - started:.0f} s."]
    with open(os.path.join(out_dir, "bench_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "bench_memory.json"), "w") as f:
        json.dump(dict(command=sys.argv, device=device, torch=torch.__version__, rows=rows), f, indent=1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_memory.md / .json")
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tinyllama")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state init, compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--data", default=None, help="folder of uint16 *.bin token shards: adds loss rows")
    parser.add_argument("--loss_steps", type=int, default=200, help="steps of each loss row (with --data)")
    parser.add_argument("--loss_batch", type=int, default=1)
    parser.add_argument("--time_budget_s", type=float, default=420, help="start no row after this many seconds")
    parser.add_argument("--setups", nargs="+", default=None, help="only the rows whose name contains one of these")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu --model tiny for a smoke run")
    os.makedirs(args.out, exist_ok=True)

    started, rows = time.time(), []
    setups = [s for s in _setups() if args.setups is None or any(part in s.name for part in args.setups)]
    if not setups:
        raise SystemExit(f"--setups {args.setups} matches no row; rows: {[s.name for s in _setups()]}")
    runs = [(setup, batch, args.steps, None) for setup in setups for batch in args.batch_sizes]
    if args.data is not None:
        # Loss after a few hundred steps on real text: the FP32-state baseline against the 8-bit ones.
        # (not the CPU-offloaded row: its CPU step of seconds would take the time of all the others)
        compared = [s for s in setups if s.weights in ("fp32", "bf16", "int8_weight_only")
                    and "4bit" not in s.name and "offload" not in s.name]
        runs += [(setup, args.loss_batch, args.loss_steps, args.data) for setup in compared]
    for setup, batch, steps, data_dir in runs:
        row = dict(setup=setup.name, batch=batch)
        if data_dir is not None:
            row["loss_steps"] = steps
        if setup.make_optimizer is None:
            row["note"] = setup.note
        elif time.time() - started > args.time_budget_s:
            row["note"] = f"skipped: past --time_budget_s {args.time_budget_s:.0f}"
        else:
            row |= run_setup(setup, args, batch, steps, data_dir)
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(rows, args, args.out, started)
    print("\n".join(_targets(rows)))
    return rows


if __name__ == "__main__":
    main()
