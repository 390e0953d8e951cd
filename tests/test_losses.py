import pytest
import torch
from torch.nn import functional as F

from pkd.losses import DISTILL_LOSS_REGISTRY, PKDLoss, DistillInputs, channel_pearson
from pkd.losses.pkd import pkd_loss


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 9, 11, generator=g), torch.randn(2, 8, 9, 11, generator=g)


def _closed_form(student, teacher):
    """(1/C) sum_c (M-1)/M (1 - r_c), METHODS.md."""
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
    assert pkd_loss(student, teacher).item() == pytest.approx(pkd_loss(up, teacher).item(), rel=1e-6)
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
