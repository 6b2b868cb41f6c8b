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
