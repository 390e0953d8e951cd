import math

import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import pkd.losses.fgd  # noqa: F401  (registers "FGD")
import pkd.losses.mse  # noqa: F401  (registers "MSE")
from pkd.config import get_distill_cfg
from pkd.losses import DISTILL_LOSS_REGISTRY, DistillInputs, build_distill_losses
from pkd.losses.fgd import FGDLoss, MultiLevelFGDLoss, fgd_attention, fgd_masks

from pkd_testing import TINY_INPUT, TINY_TEACHER_OPTS, build_seeded, distill_cfg, make_batch

A, B = 1 / 15, 1 / 9


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _loop_masks(gt_boxes, feature_size, image_size):
    """FGD's mask rule (the authors' code) written box by box, cell by cell."""
    h, w = feature_size
    fg = torch.zeros(len(gt_boxes), h, w)
    bg = torch.zeros(len(gt_boxes), h, w)
    for i, boxes in enumerate(gt_boxes):
        for x1, y1, x2, y2 in boxes:
            w_min = math.floor(x1 / image_size[1] * w)
            w_max = math.ceil(x2 / image_size[1] * w)
            h_min = math.floor(y1 / image_size[0] * h)
            h_max = math.ceil(y2 / image_size[0] * h)
            area = 1.0 / ((h_max + 1 - h_min) * (w_max + 1 - w_min))
            for r in range(max(h_min, 0), min(h_max, h - 1) + 1):
                for c in range(max(w_min, 0), min(w_max, w - 1) + 1):
                    fg[i, r, c] = max(fg[i, r, c].item(), area)
        bg[i] = (fg[i] == 0).float()
        if bg[i].sum() > 0:
            bg[i] /= bg[i].sum()
    return fg, bg


def test_masks_hand_computed_overlap_smaller_box_wins():
    # Stride 8: box A covers rows 1..3, cols 1..5 (area 1/15; its edges fall exactly on cell
    # boundaries, and painting is inclusive); B rows 0..2, cols 2..4 (area 1/9).
    boxes = _boxes([8, 8, 40, 24], [20, 4, 28, 12])
    fg, bg = fgd_masks([boxes], (4, 6), (32, 48))
    expected = torch.tensor([
        [0, 0, B, B, B, 0],
        [0, A, B, B, B, A],
        [0, A, B, B, B, A],
        [0, A, A, A, A, A],
    ])
    assert fg.shape == bg.shape == (1, 4, 6)
    torch.testing.assert_close(fg[0], expected)
    torch.testing.assert_close(bg[0], (expected == 0).float() / 6)


def test_masks_border_box_counts_phantom_row_and_column():
    # x: 4..6, y: 2..4 on a 4x6 map: paints rows 2..3, cols 4..5, but the weight uses 3x3 cells.
    fg, _ = fgd_masks([_boxes([32, 16, 48, 32])], (4, 6), (32, 48))
    expected = torch.zeros(4, 6)
    expected[2:4, 4:6] = 1 / 9
    torch.testing.assert_close(fg[0], expected)


def test_masks_scale_with_the_padded_input_size():
    # The same box in a batch padded to 64 rows: y scales by 4/64, so y 8..24 -> rows 0..2
    # (0.5 -> 0, 1.5 -> 2), x 8..40 -> cols 1..5; area 1/(3*5).
    fg, _ = fgd_masks([_boxes([8, 8, 40, 24])], (4, 6), (64, 48))
    expected = torch.zeros(4, 6)
    expected[0:3, 1:6] = A
    torch.testing.assert_close(fg[0], expected)


def test_masks_without_boxes_and_bg_normalisation():
    boxes = [_boxes([8, 8, 40, 24]), torch.zeros(0, 4), _boxes([0, 0, 48, 32])]
    fg, bg = fgd_masks(boxes, (4, 6), (32, 48))
    torch.testing.assert_close(bg[0].sum(), torch.tensor(1.0))
    assert (fg[1] == 0).all()
    torch.testing.assert_close(bg[1], torch.full((4, 6), 1 / 24))
    # Fully covered: no background at all (and no division by zero).
    assert (bg[2] == 0).all() and (fg[2] > 0).all()


def test_masks_carry_no_grad():
    boxes = _boxes([8, 8, 40, 24]).requires_grad_(True)
    fg, bg = fgd_masks([boxes], (4, 6), (32, 48))
    assert not fg.requires_grad and not bg.requires_grad


def test_vectorised_masks_match_a_per_box_loop():
    g = torch.Generator().manual_seed(0)
    image_size = (75, 100)
    for feature_size in [(10, 13), (5, 7), (19, 25)]:
        gt_boxes = []
        for k in (6, 0, 3, 11):
            xy = torch.rand(k, 2, generator=g) * torch.tensor([90.0, 65.0])
            wh = 1 + torch.rand(k, 2, generator=g) * torch.tensor([40.0, 30.0])
            boxes = torch.cat([xy, xy + wh], dim=1)
            boxes[:, 2].clamp_(max=image_size[1])
            boxes[:, 3].clamp_(max=image_size[0])
            gt_boxes.append(boxes)
        fg, bg = fgd_masks(gt_boxes, feature_size, image_size)
        fg_ref, bg_ref = _loop_masks(gt_boxes, feature_size, image_size)
        torch.testing.assert_close(fg, fg_ref)
        torch.testing.assert_close(bg, bg_ref)


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 9, 11, generator=g), torch.randn(2, 8, 9, 11, generator=g)


def test_attention_maps_average_to_one(maps):
    spatial, channel = fgd_attention(maps[0], 0.5)
    assert spatial.shape == (2, 9, 11) and channel.shape == (2, 8)
    torch.testing.assert_close(spatial.mean(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(channel.mean(dim=1), torch.ones(2))
    assert (spatial > 0).all() and (channel > 0).all()


def test_terms_follow_the_formulas(maps):
    s, t = maps
    boxes = [_boxes([8, 8, 40, 24]), torch.zeros(0, 4)]
    image_size = (72, 88)
    loss = FGDLoss(8, 8, temperature=0.5, alpha=2.0, beta=3.0, gamma=5.0, lambda_=7.0)
    terms = loss.terms(s, t, boxes, image_size)
    fg, bg = fgd_masks(boxes, (9, 11), image_size)
    spatial_t, channel_t = fgd_attention(t, 0.5)
    spatial_s, channel_s = fgd_attention(s, 0.5)
    weight = spatial_t[:, None] * channel_t[:, :, None, None]
    sq = (s - t) ** 2
    torch.testing.assert_close(terms["fg"], 2.0 * (fg[:, None] * weight * sq).sum() / 2)
    torch.testing.assert_close(terms["bg"], 3.0 * (bg[:, None] * weight * sq).sum() / 2)
    att = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / 2
    torch.testing.assert_close(terms["att"], 5.0 * att)
    torch.testing.assert_close(loss(s, t, boxes, image_size), sum(terms.values()))


def test_global_term_at_init_is_the_unnormalised_feature_mse(maps):
    s, t = maps
    loss = FGDLoss(8, 8, alpha=0.0, beta=0.0, gamma=0.0, lambda_=1.0)
    assert loss.align is None
    out = loss.terms(s, t, [torch.zeros(0, 4)] * 2, (72, 88))["global"]
    assert torch.equal(out, (s - t).square().sum() / 2)


def test_context_blocks_layout_and_init():
    loss = FGDLoss(8, 6)
    assert (loss.align.in_channels, loss.align.out_channels) == (8, 6)
    for block in (loss.student_context, loss.teacher_context):
        assert block.conv_mask.out_channels == 1
        assert [m.__class__.__name__ for m in block.channel_add] == [
            "Conv2d", "LayerNorm", "ReLU", "Conv2d"]
        assert block.channel_add[0].out_channels == 3
        assert (block.channel_add[-1].weight == 0).all() and (block.channel_add[-1].bias == 0).all()


def test_resize_channel_mismatch_and_empty_image_are_finite():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 8, 5, 6, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 10, 12, generator=g, requires_grad=True)
    loss = FGDLoss(8, 4)
    with torch.no_grad():  # make the context blocks non-trivial so every parameter gets a grad
        for block in (loss.student_context, loss.teacher_context):
            block.channel_add[-1].weight.normal_(generator=g)
    out = loss(student, teacher, [_boxes([3, 5, 40, 30]), torch.zeros(0, 4)], (80, 96))
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fgd_builds_from_yacs():
    cfg = get_distill_cfg()
    cfg.MODEL.DISTILL.LOSSES = ["FGD"]
    cfg.MODEL.DISTILL.FGD.TEMPERATURE = 0.8
    student = {f"p{i}": ShapeSpec(channels=64, stride=2**i) for i in range(3, 8)}
    teacher = {f"p{i}": ShapeSpec(channels=32, stride=2**i) for i in range(2, 7)}
    pairs = [("p3", "p2"), ("p4", "p3"), ("p5", "p4")]
    fgd = build_distill_losses(
        cfg, feature_pairs=pairs, student_shapes=student, teacher_shapes=teacher
    )["FGD"]
    assert DISTILL_LOSS_REGISTRY.get("FGD") is MultiLevelFGDLoss
    assert fgd.has_adapter and not fgd.needs_predictions
    assert len(fgd.per_pair) == 3
    for module in fgd.per_pair:
        assert (module.student_channels, module.teacher_channels) == (64, 32)
        assert module.align.out_channels == 32 and module.temperature == 0.8
        assert module.term_weights == {"fg": 1e-3, "bg": 5e-4, "att": 5e-4, "global": 5e-6}


def test_multi_level_loss_outside_a_trainer(maps):
    s, t = maps
    batch = make_batch(sizes=((72, 88), (72, 88)), boxes_per_image=(2, 0))
    inputs = DistillInputs(
        levels=["p3"], student_features=[s], teacher_features=[t],
        gt_instances=[x["instances"] for x in batch], image_size=(72, 88),
    )
    out = MultiLevelFGDLoss(channels=[(8, 8)])(inputs)  # no EventStorage: nothing logged, no error
    assert set(out) == {"loss_fgd_p3"} and torch.isfinite(out["loss_fgd_p3"])


def _train_step(model):
    model.train()
    with EventStorage() as storage:
        losses = model(make_batch())
        sum(losses.values()).backward()
    return losses, storage


def test_distill_meta_arch_with_fgd():
    model = build_seeded(distill_cfg("RetinaNet", TINY_INPUT + ["MODEL.DISTILL.LOSSES", "['FGD']"]))
    fgd = model.distill_losses["FGD"]
    fgd_params = {id(p) for p in fgd.parameters()}
    assert fgd_params and fgd_params <= {id(p) for p in model.parameters() if p.requires_grad}
    losses, storage = _train_step(model)
    levels = ["p3", "p4", "p5", "p6"]
    assert sorted(k for k in losses if k.startswith("loss_fgd_")) == [f"loss_fgd_{l}" for l in levels]
    assert all(torch.isfinite(v) for v in losses.values())
    for level in levels:
        parts = [storage.history(f"fgd/{k}_{level}").latest() for k in ("fg", "bg", "att", "global")]
        assert sum(parts) == pytest.approx(losses[f"loss_fgd_{level}"].item(), rel=1e-5)
    assert all(p.grad is not None for p in fgd.parameters())
    assert any(p.grad.abs().sum() > 0 for p in fgd.parameters())


def test_channel_mismatched_pairs_with_fgd_and_mse():
    teacher_opts = TINY_TEACHER_OPTS + ["MODEL.FPN.OUT_CHANNELS", "32"]
    cfg = distill_cfg("RetinaNet", TINY_INPUT + [
        "MODEL.DISTILL.LOSSES", "['FGD', 'MSE']", "MODEL.DISTILL.TEACHER.OPTS", str(teacher_opts)])
    model = build_model(cfg)
    assert all(m.align is not None for m in model.distill_losses["FGD"].per_pair)
    assert all(a.out_channels == 32 for a in model.distill_losses["MSE"].adapters)
    losses, _ = _train_step(model)
    assert {"loss_fgd_p3", "loss_mse_p3", "loss_fgd_p6", "loss_mse_p6"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    for module in model.distill_losses["FGD"].per_pair:
        assert module.align.weight.grad.abs().sum() > 0
    assert all(a.weight.grad.abs().sum() > 0 for a in model.distill_losses["MSE"].adapters)
