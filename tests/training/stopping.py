"""Stopping a training run from inside a test the way a job scheduler does: with SIGTERM."""

import os
import signal


def sigterm_during_step(monkeypatch, batches_class, step: int) -> None:
    """This process gets SIGTERM while the loop draws the first micro-batch of `step` from a `batches_class`
    (a class with `micro_batches_drawn`, one micro-batch a step)."""
    draw = batches_class.__next__

    def draw_then_signal(self):
        if self.micro_batches_drawn == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw(self)
    monkeypatch.setattr(batches_class, "__next__", draw_then_signal)
