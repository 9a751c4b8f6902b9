import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # These tests use tensors of a few thousand elements: on a shared 2-core machine, intra-op
    # threading makes them tens of times slower instead of faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
