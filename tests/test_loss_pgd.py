import os

import pytest
import torch

from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from pkd.config import get_distill_cfg
from pkd.losses import DISTILL_LOSS_REGISTRY
from pkd.losses.pgd import (  # importing the module registers "PGD"
    PGDLoss,
    gaussian_weights,
    key_location_weights,
    pgd_cls_loss,
    pgd_reg_loss,
    pgd_value_maps,
)

from pkd_testing import DEMO, TINY_INPUT, build_seeded, make_batch

# A non-square padded input (H=128, W=256): head levels p3..p7 of strides 8..128.
GRID = [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
STRIDES = [8, 16, 32, 64, 128]


def _cfg(name, opts=()):
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(DEMO, name))
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "random"
    cfg.merge_from_list(TINY_INPUT + list(opts))
    return cfg


@pytest.fixture(scope="module")
def fcos():
    return build_seeded(_cfg("FCOS-R18-teacher.yaml")).eval()


def _instances(boxes, classes, size=(128, 256)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _fcos_outputs(logits=None):
    """Hand-made FCOS head material on GRID: every point predicts a (2s x 2s) box around itself."""
    features = [torch.zeros(1, 8, h, w) for h, w in GRID]
    logits = logits or [torch.zeros(1, 3, h, w) for h, w in GRID]
    deltas = [torch.ones(1, 4, h, w) for h, w in GRID]
    ctrness = [torch.zeros(1, 1, h, w) for h, w in GRID]
    return features, [logits, deltas, ctrness]


def _center(model, level, y, x):
    offset = model.anchor_generator.offset
    return (x + offset) * STRIDES[level], (y + offset) * STRIDES[level]


def _strictly_inside(point, box):
    return box[0] < point[0] < box[2] and box[1] < point[1] < box[3]


# -- Gaussian key-location weights --------------------------------------------------------------


def test_weight_is_one_at_the_gaussian_mean():
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="xy"), -1)
    points = (grid.reshape(1, 9, 2) * torch.tensor([8.0, 4.0]) + 40).repeat(2, 1, 1)
    exact = gaussian_weights(points, noise=0.0)
    assert exact[:, 4].tolist() == [1.0, 1.0]  # the centre point of a symmetric 3x3 grid
    assert (exact[:, [0, 1, 2, 3, 5, 6, 7, 8]] < 1).all()
    torch.manual_seed(0)
    noisy = gaussian_weights(points)  # +-0.05 px noise moves the mean a little
    assert noisy[:, 4].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_weights_use_the_full_covariance():
    # Candidates spread along x: (2, 0) is farther from the mean (4, 0) than (4, 1) but likelier.
    points = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [6.0, 0.0], [8.0, 0.0],
                            [4.0, 1.0], [4.0, -1.0]]])  # fmt: skip
    w = gaussian_weights(points, noise=0.0)[0]
    var_x, var_y = 40 / 7, 2 / 7  # biased variances
    assert w[1].item() == pytest.approx(torch.exp(torch.tensor(-0.5 * 4 / var_x)).item(), rel=1e-5)
    assert w[5].item() == pytest.approx(torch.exp(torch.tensor(-0.5 * 1 / var_y)).item(), rel=1e-5)
    assert w[2] == 1.0 and w[5] < w[1]
    # Collinear candidates have a singular covariance: the noise keeps the weights finite.
    torch.manual_seed(0)
    w = gaussian_weights(points[:, :5])
    assert torch.isfinite(w).all() and ((w > 0) & (w <= 1)).all()


def test_single_candidate_has_weight_one():
    assert gaussian_weights(torch.tensor([[[5.0, 7.0]]])).item() == 1.0


def test_key_locations_at_most_k_and_strictly_inside():
    torch.manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(0.0, 96, 8), torch.arange(0.0, 160, 8), indexing="ij")
    centers = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (R, 2)
    boxes = torch.tensor([[12.0, 20.0, 70.0, 48.0], [80.0, 0.0, 150.0, 90.0]])
    quality = torch.rand(len(centers), 2)
    on_edge = (centers[:, 0] == 80) & (centers[:, 1] == 40)
    quality[on_edge, 1] = 2.0  # the best candidate of GT 1 sits on its left edge
    for g in range(2):
        w = key_location_weights(centers, quality[:, g : g + 1], boxes[g : g + 1], topk=9)
        selected = w.nonzero().squeeze(1)
        assert 0 < len(selected) <= 9
        assert all(_strictly_inside(centers[i].tolist(), boxes[g].tolist()) for i in selected)
    both = key_location_weights(centers, quality, boxes, topk=9)
    assert both[on_edge].item() == 0.0
    assert len(both.nonzero()) <= 18


# -- value maps from a teacher's predictions ------------------------------------------------------


def test_value_maps_orientation_on_a_non_square_grid(fcos):
    box = [150.0, 10.0, 230.0, 60.0]  # top right of a wide image
    features, outputs = _fcos_outputs()
    (cls_maps, reg_maps), background = pgd_value_maps(
        fcos, features, outputs, [_instances([box], [1])], topk=30, quality_alphas=(0.8, 0.6)
    )
    selected = 0
    for level, (h, w) in enumerate(GRID):
        for maps in (cls_maps, reg_maps, background):
            assert maps[level].shape == (1, h, w)
        for y in range(h):
            for x in range(w):
                inside = _strictly_inside(_center(fcos, level, y, x), box)
                assert background[level][0, y, x].item() == float(not inside)
                for maps in (cls_maps, reg_maps):
                    if maps[level][0, y, x] > 0:
                        assert inside, (level, y, x)
                selected += int(cls_maps[level][0, y, x] > 0)
    assert 0 < selected <= 30


def test_value_maps_use_the_gt_class_score(fcos):
    box = [40.0, 20.0, 200.0, 110.0]
    logits = [torch.full((1, 3, h, w), -20.0) for h, w in GRID]
    logits[1][0, 2, 3, 5] = 5.0  # class 2 at p4 (y=3, x=5): the GT's class
    logits[1][0, 0, 3, 9] = 9.0  # another class, higher, at p4 (y=3, x=9)
    features, outputs = _fcos_outputs(logits)
    (maps,), _ = pgd_value_maps(
        fcos, features, outputs, [_instances([box], [2])], topk=1, quality_alphas=(0.8,)
    )
    assert maps[1][0, 3, 5].item() == 1.0  # the single candidate gets weight 1
    assert sum(int((m > 0).sum()) for m in maps) == 1


def test_several_anchors_per_location_reduce_by_max():
    retina = build_seeded(_cfg("RetinaNet-R18-teacher.yaml")).eval()
    a = retina.anchor_generator.num_anchors[0]
    assert a > 1
    torch.manual_seed(1)
    features = [torch.zeros(1, 8, h, w) for h, w in GRID]
    outputs = [
        [torch.randn(1, a * 3, h, w) for h, w in GRID],
        [torch.randn(1, a * 4, h, w) * 0.1 for h, w in GRID],
    ]
    gt = _instances([[30.0, 20.0, 120.0, 100.0], [140.0, 8.0, 250.0, 60.0]], [0, 2])
    (maps,), background = pgd_value_maps(
        retina, features, outputs, [gt], topk=30, quality_alphas=(0.6,), noise=0.0
    )
    # Reference: per-anchor weights, indexed explicitly in Detectron2's (level, y, x, anchor) order.
    anchors = Boxes.cat(retina.anchor_generator(features))
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(-1, 4) for d in outputs[1]])
    scores = torch.cat([s.permute(0, 2, 3, 1).reshape(-1, 3) for s in outputs[0]]).sigmoid()
    boxes = retina.box2box_transform.apply_deltas(deltas, anchors.tensor)
    iou = pairwise_iou(Boxes(boxes), gt.gt_boxes).clamp_min(0)
    quality = scores[:, gt.gt_classes] ** 0.4 * iou**0.6
    weights = key_location_weights(anchors.get_centers(), quality, gt.gt_boxes.tensor, 30, 0.0)
    start = 0
    for level, (h, w) in enumerate(GRID):
        for y in range(h):
            for x in range(w):
                first = start + (y * w + x) * a
                assert maps[level][0, y, x] == weights[first : first + a].max()
        start += h * w * a
    assert sum(int((m > 0).sum()) for m in maps) <= 60


def test_image_without_boxes(fcos):
    features, outputs = _fcos_outputs()
    (cls_maps, reg_maps), background = pgd_value_maps(
        fcos, features, outputs, [_instances([], [])], topk=30, quality_alphas=(0.8, 0.6)
    )
    assert all((m == 0).all() for m in cls_maps + reg_maps)
    assert all((b == 1).all() for b in background)


# -- the two losses ------------------------------------------------------------------------------


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 6, 10, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 6, 10, generator=g, requires_grad=True)
    value = torch.zeros(2, 6, 10)
    value[0, 2:4, 3:7] = torch.rand(2, 4, generator=g)
    background = torch.ones(2, 6, 10)
    background[0, 1:5, 2:8] = 0
    return s, t, value, background


def test_losses_zero_for_identical_maps(maps):
    s, _, value, background = maps
    t = s.detach().clone()
    assert pgd_cls_loss(s, t, value, background).item() == pytest.approx(0, abs=1e-7)
    assert pgd_reg_loss(s, t, value).item() == pytest.approx(0, abs=1e-7)


def test_gradients_reach_the_student_only(maps):
    s, t, value, background = maps
    loss = pgd_cls_loss(s, t, value, background) + pgd_reg_loss(s, t, value)
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_reg_loss_without_key_locations(maps):
    s, t, _, _ = maps
    loss = pgd_reg_loss(s, t, torch.zeros(2, 6, 10))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert s.grad is not None


def test_fg_term_only_counts_key_locations(maps):
    s, t, value, background = maps
    changed = t.detach().clone()
    changed[1] += 3.0  # image 1 has no key location and is all background
    fg = dict(alpha=1.0, beta=0.0, delta=0.0)
    assert pgd_cls_loss(s, t, value, background, **fg).item() == pytest.approx(
        pgd_cls_loss(s, changed, value, background, **fg).item()
    )


# -- in DistillMetaArch --------------------------------------------------------------------------


def test_registered_and_configured():
    cfg = _cfg("PGD-FCOS-R18.yaml", ["MODEL.DISTILL.PGD.TOPK", "9"])
    pairing = dict(feature_pairs=[], student_shapes={}, teacher_shapes={})
    loss = DISTILL_LOSS_REGISTRY.get("PGD")(cfg, **pairing)
    assert isinstance(loss, PGDLoss) and loss.needs_predictions
    assert loss.topk == 9 and loss.quality_alphas == (0.8, 0.6)


def test_training_step_fcos_student_and_teacher():
    model = build_seeded(_cfg("PGD-FCOS-R18.yaml")).train()
    with EventStorage() as storage:
        losses = model(make_batch())  # second image has no boxes
        sum(losses.values()).backward()
        plain = model.student(make_batch())
    levels = [s for s, _ in model.feature_pairs]
    expected = {f"loss_pgd_{kind}_{s}" for s in levels for kind in ("cls", "reg")}
    assert expected <= set(losses)
    assert set(losses) - expected == set(plain)
    assert all(torch.isfinite(v) for v in losses.values())
    assert storage.history("kd/pgd_key_locations_per_gt").latest() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.backbone.parameters())


def test_student_level_outside_the_head_is_an_error():
    cfg = _cfg("PGD-FCOS-R18.yaml", ["MODEL.FCOS.IN_FEATURES", "['p4', 'p5', 'p6', 'p7']"])
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.FCOS.IN_FEATURES", "['p4', 'p5', 'p6', 'p7']"]
    model = build_seeded(cfg).train()
    with EventStorage(), pytest.raises(ValueError, match="student level p3.*head levels"):
        model(make_batch())
