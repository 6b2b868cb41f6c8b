import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lenet():
    from compactor.demo import LeNet

    torch.manual_seed(0)
    m = LeNet().eval()
    return m


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread, so OpenMP does not spin against other processes."""
    from compactor.timing import torch_threads

    with torch_threads(1):
        yield
