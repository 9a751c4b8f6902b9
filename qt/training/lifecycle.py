"""How an entry point begins and ends a run: every generator seeded the same way, and a distinct exit
status for a run that SIGINT / SIGTERM stopped before its last step."""

from __future__ import annotations

import random

import numpy as np
import torch

# EX_TEMPFAIL (sysexits.h): "try again later". A job script or scheduler can tell a stopped run (continue it
# with --resume) from a finished one (0) and from bad input (2).
STOPPED_EXIT_STATUS = 75


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU) with --seed: initialization,
    dropout, augmentations and the recipes' stochastic rounding (drawn from torch's generator on the
    tensor's device) then repeat run to run. Every rank takes the same seed: the ranks must build the same
    initial weights, and DDP replicas of an int8_weight_only model must round their updates alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def exit_if_stopped(batches, cfg, dist_info, unwritten: str | None = None) -> None:
    """Exit with STOPPED_EXIT_STATUS when the loop returned before cfg.n_steps (SIGINT / SIGTERM: it saved a
    checkpoint and printed how to continue), saying what is `unwritten` until the run completes. Told by
    the micro-batches drawn, a count that `batches` (InstructBatches, ImageBatches) keep in their
    checkpointed state, so a resumed finished run counts as finished."""
    if batches.micro_batches_drawn >= cfg.n_steps * cfg.grad_accum:
        return
    if dist_info.is_main:
        print(f"exit status {STOPPED_EXIT_STATUS}: the run is not complete"
              + (f"; {unwritten} is written when it is" if unwritten else ""), flush=True)
    raise SystemExit(STOPPED_EXIT_STATUS)
