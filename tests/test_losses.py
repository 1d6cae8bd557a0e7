"""Spatial-affinity distillation loss: chunked == direct, gradients, feature capture."""

import pytest
import torch
from torch import nn

import adapterlab as al
from adapterlab.losses import affinity_l1, capture, spatial_affinity_loss


def direct(s, t, eps=1e-7):
    """The definition, in one piece: normalise over channels, HW×HW affinities, mean |difference|."""

    def aff(f):
        f = f.flatten(2)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        return f.transpose(1, 2) @ f

    return (aff(s) - aff(t)).abs().mean()


@pytest.mark.parametrize("chunk", [1, 7, 25, 1000])
def test_chunked_equals_direct(chunk):
    gen = torch.Generator().manual_seed(chunk)
    s, t = torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 6, 5, 5, generator=gen)
    assert torch.allclose(affinity_l1(s, t, chunk=chunk), direct(s, t), atol=1e-6)


def test_gradient_matches_direct_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 4, 3, generator=gen, dtype=torch.float64)
    affinity_l1(s, t, chunk=5).backward()
    s2 = s.detach().clone().requires_grad_()
    direct(s2, t).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: affinity_l1(x, t, chunk=4), (s.detach().requires_grad_(),))


def test_sum_over_layers_and_capture():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    with capture(student, ["0", "2"]) as fs:
        student(x)
    with torch.no_grad(), capture(teacher, ["0", "2"]) as ft:
        teacher(x)
    loss = spatial_affinity_loss(fs, ft, chunk=8)
    assert torch.allclose(loss, direct(fs["0"], ft["0"]) + direct(fs["2"], ft["2"]), atol=1e-6)
    loss.backward()
    assert student[0].weight.grad is not None and teacher[0].weight.grad is None
    assert not student[0]._forward_hooks  # hooks removed
    with pytest.raises(al.TargetError, match="'2x'"), capture(student, ["2x"]):
        pass
    with pytest.raises(al.ConfigError, match="one teacher map per student map"):
        spatial_affinity_loss([fs["0"]], [])
    with pytest.raises(al.ConfigError, match="share batch and spatial size"):
        affinity_l1(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4))
