import pytest
import torch

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Test models are tiny: OpenMP threads cost more than they give, and on shared cores they spin against
    # each other (DenseNet-121's first forward: seconds with 2 threads, ~0.05 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
