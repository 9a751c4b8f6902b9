"""Which examples each micro-batch holds, epoch after epoch, for fine-tuning on a finite dataset; and a batch
iterator's position in a checkpoint, in optimizer steps (any --grad_accum can continue it)."""

from __future__ import annotations

import numpy as np

from qt.training.config import ConfigError

# Length bucketing sorts examples by length within windows of this many global batches: large enough that
# a batch's examples have similar lengths, small enough that batches stay a random mix of the data.
BUCKET_WINDOW_BATCHES = 64


def position_state(micro_batches_drawn: int, grad_accum: int) -> dict:
    """A batch iterator's position in a checkpoint: micro-batches drawn, and how many make a step."""
    return {"micro_batches_drawn": micro_batches_drawn, "grad_accum": grad_accum}


def micro_batches_after_resume(state: dict, grad_accum: int) -> int:
    """The micro-batches to count as drawn when a run resumes from `state` with `grad_accum` micro-steps a
    step: the same number of optimizer steps, whatever --grad_accum the checkpoint was written with (a resume
    on fewer GPUs may take more micro-steps; checkpoints written before the state held it kept it unchanged)."""
    steps, partial = divmod(state["micro_batches_drawn"], state.get("grad_accum", grad_accum))
    if partial:
        raise ValueError(f"a data position {state} inside an optimizer step cannot be resumed")
    return steps * grad_accum


class EpochSampler:
    """The example indices of micro-batch k of this rank, a pure function of (seed, k).

    Each epoch is a permutation drawn from (seed, epoch), cut into global batches of `batch_size` (the
    incomplete last one is dropped); each global batch is dealt out to micro-steps and ranks, so a resumed
    run needs only the count of micro-batches drawn. With `lengths`, examples are sorted by length inside
    windows of BUCKET_WINDOW_BATCHES batches and the batches shuffled again: padding to the longest example
    of a micro-batch then costs little.
    """

    def __init__(self, n_examples: int, batch_size: int, *, grad_accum: int, seed: int, rank: int,
                 world_size: int, lengths: np.ndarray | None = None, what: str = "examples"):
        if n_examples < batch_size:
            raise ConfigError(f"the training split has {n_examples} {what}, fewer than one --batch_size "
                              f"{batch_size}; lower --batch_size or give more data")
        self.n_examples, self.batch_size, self.grad_accum = n_examples, batch_size, grad_accum
        self.seed, self.rank, self.world_size, self.lengths = seed, rank, world_size, lengths
        self.steps_per_epoch = n_examples // batch_size
        self._epoch, self._batches = None, None

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, batch_size) example indices of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_examples)
        if self.lengths is not None:
            window = self.batch_size * BUCKET_WINDOW_BATCHES
            order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")]
                                    for chunk in np.split(order, range(window, self.n_examples, window))])
        batches = order[:self.steps_per_epoch * self.batch_size].reshape(self.steps_per_epoch, self.batch_size)
        return batches[rng.permutation(self.steps_per_epoch)] if self.lengths is not None else batches

    def micro_batch(self, k: int) -> np.ndarray:
        """This rank's example indices for its k-th micro-batch (0-based, over all epochs)."""
        step, micro_step = divmod(k, self.grad_accum)
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.global_batches(epoch)
        return self._batches[index].reshape(self.grad_accum, self.world_size, -1)[micro_step, self.rank]
