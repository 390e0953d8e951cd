import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec

import pkd.losses.mse  # noqa: F401  (registers "MSE")
from pkd.config import get_distill_cfg
from pkd.losses import DISTILL_LOSS_REGISTRY, DistillInputs, build_distill_losses
from pkd.losses.mse import MSELoss, mse_loss


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 9, 11, generator=g), torch.randn(2, 8, 9, 11, generator=g)


def _inputs(student_maps, teacher_maps):
    levels = [f"p{i + 3}" for i in range(len(student_maps))]
    return DistillInputs(
        levels=levels, student_features=list(student_maps), teacher_features=list(teacher_maps),
        gt_instances=[], image_size=(72, 88),
    )


def test_value_is_the_mean_squared_error(maps):
    s, t = maps
    assert mse_loss(torch.full((1, 2, 3, 3), 2.0), torch.zeros(1, 2, 3, 3)).item() == 4.0
    assert mse_loss(s, t).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    assert mse_loss(s, s.clone()).item() == 0.0


def test_student_is_resized_to_the_teacher():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 5, 6, generator=g)
    teacher = torch.randn(2, 4, 10, 12, generator=g)
    up = F.interpolate(student, size=(10, 12), mode="bilinear", align_corners=False)
    assert mse_loss(student, teacher).item() == pytest.approx(F.mse_loss(up, teacher).item())


def test_module_resize_rule_both_ways():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, 4, 5, 6, generator=g)
    teacher = torch.randn(2, 4, 10, 12, generator=g)
    down = F.interpolate(teacher, size=(5, 6), mode="bilinear", align_corners=False)
    out = MSELoss(weight=2.0, resize_student=False)(_inputs([student], [teacher]))
    assert out["loss_mse_p3"].item() == pytest.approx(2 * F.mse_loss(student, down).item())
    out = MSELoss(weight=2.0)(_inputs([student], [teacher]))
    assert out["loss_mse_p3"].item() == pytest.approx(2 * mse_loss(student, teacher).item())


def test_gradient_reaches_student_only(maps):
    s, t = (x.clone().requires_grad_(True) for x in maps)
    mse_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_fp16_input_is_computed_in_fp32(maps):
    s, t = maps
    assert mse_loss(s.half(), t.half()).dtype == torch.float32


def test_channel_mismatch_without_adapter_is_an_error(maps):
    s, t = maps
    with pytest.raises(ValueError, match="channel"):
        mse_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="channel"):
        MSELoss()(_inputs([s], [t[:, :4]]))


def test_adapters_only_where_channels_differ(maps):
    s, t = maps
    loss = MSELoss(weight=3.0, channels=[(8, 8), (8, 4)])
    assert isinstance(loss.adapters[0], nn.Identity)
    assert isinstance(loss.adapters[1], nn.Conv2d)
    assert (loss.adapters[1].in_channels, loss.adapters[1].out_channels) == (8, 4)
    student = s.clone().requires_grad_(True)
    out = loss(_inputs([student, student], [t, t[:, :4]]))
    assert set(out) == {"loss_mse_p3", "loss_mse_p4"}
    assert out["loss_mse_p3"].item() == pytest.approx(3 * mse_loss(s, t).item())
    expected = 3 * mse_loss(loss.adapters[1](s), t[:, :4])
    assert out["loss_mse_p4"].item() == pytest.approx(expected.item())
    sum(out.values()).backward()
    assert student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_builds_from_yacs_with_adapters():
    cfg = get_distill_cfg()
    cfg.MODEL.DISTILL.LOSSES = ["MSE"]
    cfg.MODEL.DISTILL.MSE.WEIGHT = 0.5
    student = {f"p{i}": ShapeSpec(channels=64, stride=2**i) for i in range(3, 8)}
    teacher = {f"p{i}": ShapeSpec(channels=32, stride=2**i) for i in range(2, 7)}
    pairs = [("p3", "p2"), ("p4", "p3")]
    losses = build_distill_losses(
        cfg, feature_pairs=pairs, student_shapes=student, teacher_shapes=teacher
    )
    loss = losses["MSE"]
    assert DISTILL_LOSS_REGISTRY.get("MSE") is MSELoss
    assert loss.weight == 0.5 and loss.has_adapter and not loss.needs_predictions
    assert [(a.in_channels, a.out_channels) for a in loss.adapters] == [(64, 32), (64, 32)]
