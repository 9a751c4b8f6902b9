"""A batch iterator's checkpointed position resumes in optimizer steps, whatever --grad_accum continues it."""

import pytest

from qt.training.epochs import micro_batches_after_resume, position_state


def test_a_position_resumes_as_the_same_number_of_steps():
    assert micro_batches_after_resume(position_state(20, 1), 2) == 40  # 20 steps, now of two micro-batches
    assert micro_batches_after_resume(position_state(40, 4), 1) == 10
    assert micro_batches_after_resume({"micro_batches_drawn": 12}, 3) == 12  # written before grad_accum was saved


def test_a_position_inside_a_step_is_refused():
    with pytest.raises(ValueError, match="inside an optimizer step"):
        micro_batches_after_resume(position_state(5, 2), 1)
