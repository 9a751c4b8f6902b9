"""A checkpoint's random generators: a process restores its own GPU's, whatever GPUs the writer saw."""

import torch

from qt.training.checkpoint import rng_state, set_rng_state


def test_a_process_restores_its_own_gpu_generator_only(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.clone(), device)))
    saved = rng_state(torch.device("cpu"))
    own, other = torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)
    torch.rand(3)  # moves the CPU generator on: the restore must bring it back
    # Written by a process that saw two GPUs (checkpoints before 2026-11-26 kept each visible GPU's state),
    # resumed on a machine with one: only cuda:0's state is restored (setting cuda:1's failed there).
    set_rng_state({**saved, "cuda": [own, other]}, torch.device("cuda", 0))
    assert [(s.tolist(), d) for s, d in restored] == [(own.tolist(), torch.device("cuda", 0))]
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    restored.clear()
    set_rng_state({**saved, "cuda": other}, torch.device("cuda", 1))  # as written now: the own GPU's state
    assert [(s.tolist(), d) for s, d in restored] == [(other.tolist(), torch.device("cuda", 1))]
    restored.clear()
    set_rng_state({**saved, "cuda": own}, torch.device("cpu"))  # a GPU run resumed on a CPU
    assert not restored
