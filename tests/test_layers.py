"""compactor.layers: the border-corrected conv reproduces removed constant channels exactly."""

import copy

import pytest
import torch
from torch import nn

from compactor.layers import BorderCorrectedConv1d, BorderCorrectedConv2d, with_border_correction


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 3, 1), (1, "same", 1)])
@pytest.mark.parametrize("size", [(9, 9), (12, 7)])
def test_border_corrected_conv2d_equals_conv_over_constant_channels(stride, padding, dilation, size):
    """Channels 1 and 3 hold constants 0.7 and -2.0; dropping them plus the border kernel changes nothing."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 5, *size)
    x[:, 1] = 0.7
    x[:, 3] = -2.0
    keep = [0, 2, 4]
    small = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
    small.weight.data = conv.weight.data[:, keep].clone()
    small.bias.data = conv.bias.data.clone()
    kernel = 0.7 * conv.weight.data[:, 1] - 2.0 * conv.weight.data[:, 3]
    corrected = with_border_correction(small, kernel)
    assert isinstance(corrected, BorderCorrectedConv2d)
    torch.testing.assert_close(corrected(x[:, keep]), conv(x), rtol=1e-5, atol=1e-6)
    plain = small(x[:, keep]) + kernel.sum((1, 2))[None, :, None, None]
    assert (plain - conv(x)).abs().max() > 1e-3, "a plain bias fold is wrong at the zero-padded border"


def test_border_map_cache_follows_size_dtype_and_kernel_changes():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1)
    c = with_border_correction(conv, torch.randn(3, 3))
    assert isinstance(c, BorderCorrectedConv1d)
    for n in (5, 8, 5):
        x = torch.randn(1, 2, n)
        torch.testing.assert_close(c(x), conv(x) + c.border_map(x))
    c.border_kernel.mul_(2)  # an in-place edit must not serve a stale map
    x = torch.randn(1, 2, 5)
    torch.testing.assert_close(c(x), conv(x) + c.border_map(x))
    c64 = c.double()
    torch.testing.assert_close(c64(x.double()), conv.double()(x.double()) + c64.border_map(x.double()))


def test_border_corrected_conv_trains_like_a_conv():
    """Fine-tuning the compact model: gradients reach weight and bias through the frame-only correction."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    c = with_border_correction(conv, torch.randn(4, 3, 3))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    c(x).square().sum().backward()
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x2 = x.detach().clone().requires_grad_()
    (ref(x2) + c.border_map(x2)).square().sum().backward()
    torch.testing.assert_close(c.bias.grad, ref.bias.grad)
    torch.testing.assert_close(c.weight.grad, ref.weight.grad)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("size", [(1, 1), (2, 5), (3, 3)])
def test_border_corrected_conv_on_inputs_that_are_all_border(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    c = with_border_correction(conv, torch.randn(3, 3, 3))
    x = torch.randn(1, 2, *size)
    torch.testing.assert_close(c(x), conv(x) + c.border_map(x))


def test_border_corrected_conv_runs_when_moved_under_inference_mode():
    """A compact model converted inside torch.inference_mode() holds inference tensors (no version counter): the
    border correction still runs, and equals the same layer built outside."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = with_border_correction(conv, torch.randn(4, 3, 3), None)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        moved = copy.deepcopy(layer).to(torch.float64).to(torch.float32)
        torch.testing.assert_close(moved(x), expected)
