import pytest
import torch
from torch.nn import functional as F

from pkd.losses import DISTILL_LOSS_REGISTRY, PKDLoss, DistillInputs, channel_pearson, pearson_per_channel
from pkd.losses.pkd import _PearsonImitation, pkd_loss


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 9, 11, generator=g), torch.randn(2, 8, 9, 11, generator=g)


def _closed_form(student, teacher):
    """(1/C) sum_c (M-1)/M (1 - r_c): the closed form of the PKD loss through r_c, the Pearson
    correlation of channel c."""
    n, c, h, w = teacher.shape
    m = n * h * w
    s = student.transpose(0, 1).reshape(c, -1).double()
    t = teacher.transpose(0, 1).reshape(c, -1).double()
    r = torch.stack([torch.corrcoef(torch.stack([s[i], t[i]]))[0, 1] for i in range(c)])
    return ((m - 1) / m * (1 - r)).mean()


def test_identical_maps_give_zero(maps):
    s, _ = maps
    assert pkd_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-10)


def test_per_channel_affine_gives_zero(maps):
    t, _ = maps
    a = torch.rand(1, 8, 1, 1) * 5 + 0.1
    b = torch.randn(1, 8, 1, 1) * 3
    assert pkd_loss(a * t + b, t).item() == pytest.approx(0.0, abs=1e-6)


def test_negated_maps(maps):
    t, _ = maps
    m = 2 * 9 * 11
    assert pkd_loss(-t, t).item() == pytest.approx(2 * (m - 1) / m, rel=1e-5)


def test_unrelated_maps_near_one_and_closed_form(maps):
    s, t = maps
    loss = pkd_loss(s, t)
    assert loss.item() == pytest.approx(_closed_form(s, t).item(), rel=1e-4)
    assert 0.8 < loss.item() < 1.2


def test_normalisation_includes_batch_and_unbiased_std(maps):
    s, t = maps
    def norm(x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=True)
        return (x - mean) / (std + 1e-6)
    expected = F.mse_loss(norm(s), norm(t)) / 2
    assert pkd_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_resize_student_to_teacher_and_back():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 5, 6, generator=g)
    teacher = torch.randn(2, 4, 10, 12, generator=g)
    up = F.interpolate(student, size=(10, 12), mode="bilinear", align_corners=False)
    expected = pkd_loss(up, teacher).item()
    assert pkd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    down = F.interpolate(teacher, size=(5, 6), mode="bilinear", align_corners=False)
    assert pkd_loss(student, teacher, resize_student=False).item() == pytest.approx(
        pkd_loss(student, down).item(), rel=1e-6
    )


def test_gradient_reaches_student_only(maps):
    s, t = (x.clone().requires_grad_(True) for x in maps)
    pkd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_fp16_input_is_computed_in_fp32(maps):
    s, t = maps
    out = pkd_loss(s.half(), t.half())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(pkd_loss(s.half().float(), t.half().float()).item())


def test_channel_mismatch_is_an_error(maps):
    s, t = maps
    with pytest.raises(ValueError, match="channel"):
        pkd_loss(s, t[:, :4])


def test_channel_pearson_matches_closed_form(maps):
    s, t = maps
    m = 2 * 9 * 11
    r = channel_pearson(s, t).item()
    assert pkd_loss(s, t).item() == pytest.approx((m - 1) / m * (1 - r), rel=1e-4)
    assert channel_pearson(t, t).item() == pytest.approx(1.0, abs=1e-6)


def test_pkd_module_weights_every_level(maps):
    s, t = maps
    loss = PKDLoss(weight=6.0)
    inputs = DistillInputs(
        levels=["p3", "p4"], student_features=[s, t], teacher_features=[t, t],
        gt_instances=[], image_size=(72, 88),
    )
    out = loss(inputs)
    assert set(out) == {"loss_pkd_p3", "loss_pkd_p4"}
    assert out["loss_pkd_p3"].item() == pytest.approx(6 * pkd_loss(s, t).item(), rel=1e-6)
    assert out["loss_pkd_p4"].item() == pytest.approx(0.0, abs=1e-6)
    assert DISTILL_LOSS_REGISTRY.get("PKD") is PKDLoss


def _autograd_reference(student, teacher):
    """The PKD formula (pkd_loss's docstring) written with plain autograd ops: the reference
    the fused loss follows."""
    student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)

    def norm(x):
        std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True, correction=1)
        return (x - mean) / (std + 1e-6)

    return F.mse_loss(norm(student), norm(teacher)) / 2


def test_hand_written_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 8, 10, generator=g, dtype=torch.float64)
    # pkd_loss computes in fp32; gradcheck needs fp64, so check the autograd Function directly.
    def loss(s):
        up = F.interpolate(s, size=(8, 10), mode="bilinear", align_corners=False)
        return _PearsonImitation.apply(up, teacher)

    assert torch.autograd.gradcheck(loss, (student,))
    expected = _autograd_reference(student, teacher).item()
    assert loss(student).item() == pytest.approx(expected, rel=1e-12)


def test_gradient_equals_autograd_of_the_formula(maps):
    s, t = maps
    fused = s.clone().requires_grad_(True)
    reference = s.clone().requires_grad_(True)
    (3.0 * pkd_loss(fused, t)).backward()
    (3.0 * _autograd_reference(reference, t)).backward()
    torch.testing.assert_close(fused.grad, reference.grad, rtol=1e-4, atol=1e-7)


def test_constant_student_channel_has_a_finite_gradient(maps):
    s, t = maps
    s = s.clone()
    s[:, 2] = 0.5
    s.requires_grad_(True)
    pkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all()


def test_channels_last_input_gives_the_same_loss_and_gradient(maps):
    s, t = maps
    a = s.clone().requires_grad_(True)
    b = s.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    la, lb = pkd_loss(a, t), pkd_loss(b, t.to(memory_format=torch.channels_last))
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad.contiguous())


def test_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        pkd_loss(torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1))


def test_pearson_per_channel_is_each_channels_correlation():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 3, 5, 7, generator=g)
    s = torch.stack([t[:, 0] * 2 + 1, -t[:, 1], torch.randn(2, 5, 7, generator=g)], dim=1)
    r = pearson_per_channel(s, t)
    assert r.shape == (3,)
    torch.testing.assert_close(r[:2], torch.tensor([1.0, -1.0]))
    expected = torch.corrcoef(torch.stack([s[:, 2].flatten(), t[:, 2].flatten()]))[0, 1]
    torch.testing.assert_close(r[2], expected)
    torch.testing.assert_close(channel_pearson(s, t), r.mean())
