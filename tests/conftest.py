import pytest
import torch

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
