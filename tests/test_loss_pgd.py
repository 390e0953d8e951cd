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
    location_centers,
    per_location,
    pgd_cls_loss,
    pgd_reg_loss,
    pgd_value_maps,
)
from pkd.students import dense_head_outputs

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


def _material(model, features, outputs):
    """The head material of hand-made head ``outputs`` on ``features`` (taps: the features)."""
    taps = {"cls": features, "reg": features}
    anchors = model.anchor_generator(features)
    return dense_head_outputs(model, outputs, taps, anchors, decode_boxes=True)


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
        _material(fcos, features, outputs), [_instances([box], [1])], topk=30,
        quality_alphas=(0.8, 0.6),
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
        _material(fcos, features, outputs), [_instances([box], [2])], topk=1,
        quality_alphas=(0.8,),
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
        _material(retina, features, outputs), [gt], topk=30, quality_alphas=(0.6,), noise=0.0
    )
    # Reference: per-anchor quality, indexed explicitly in Detectron2's (level, y, x, anchor)
    # order; a location takes the max over its anchors, and top-k runs over locations.
    anchors = Boxes.cat(retina.anchor_generator(features))
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(-1, 4) for d in outputs[1]])
    scores = torch.cat([s.permute(0, 2, 3, 1).reshape(-1, 3) for s in outputs[0]]).sigmoid()
    boxes = retina.box2box_transform.apply_deltas(deltas, anchors.tensor)
    iou = pairwise_iou(Boxes(boxes), gt.gt_boxes).clamp_min(0)
    quality = scores[:, gt.gt_classes] ** 0.4 * iou**0.6  # (R, G)
    location_quality, centers, start = [], [], 0
    for h, w in GRID:
        for y in range(h):
            for x in range(w):
                first = start + (y * w + x) * a
                location_quality.append(quality[first : first + a].max(dim=0).values)
                centers.append(anchors.get_centers()[first])
        start += h * w * a
    weights = key_location_weights(
        torch.stack(centers), torch.stack(location_quality), gt.gt_boxes.tensor, 30, 0.0
    )
    index = 0
    for level, (h, w) in enumerate(GRID):
        for y in range(h):
            for x in range(w):
                assert maps[level][0, y, x] == weights[index]
                index += 1
    assert sum(int((m > 0).sum()) for m in maps) <= 60


def test_top_k_keeps_k_distinct_locations_of_a_multi_anchor_head():
    retina = build_seeded(_cfg("RetinaNet-R18-teacher.yaml")).eval()
    a = retina.anchor_generator.num_anchors[0]
    box = [16.0, 16.0, 240.0, 112.0]
    features = [torch.zeros(1, 8, h, w) for h, w in GRID]
    logits = []
    for level, (h, w) in enumerate(GRID):
        inside = torch.tensor(
            [[_strictly_inside(_center(retina, level, y, x), box) for x in range(w)]
             for y in range(h)]
        )
        # The GT's class scores high inside the box only, the same for every anchor there.
        level_logits = torch.full((1, a * 3, h, w), -20.0)
        level_logits[0, 1::3] = torch.where(inside, 4.0, -20.0)
        logits.append(level_logits)
    outputs = [logits, [torch.zeros(1, a * 4, h, w) for h, w in GRID]]
    (maps,), _ = pgd_value_maps(
        _material(retina, features, outputs), [_instances([box], [1])], topk=30,
        quality_alphas=(0.6,), noise=0.0,
    )
    # 30 candidate locations, not 30 anchors (which would cover only a few locations).
    assert sum(int((m > 0).sum()) for m in maps) == 30


def test_per_location_helpers_follow_detectron2s_anchor_order():
    grids, anchors_per_location = [(2, 3), (1, 2)], [2, 2]
    values = torch.arange(16.0)  # 2*3*2 + 1*2*2 anchors
    assert per_location(values, grids, anchors_per_location).tolist() == [
        1, 3, 5, 7, 9, 11, 13, 15
    ]
    boxes = torch.tensor([[x, 0.0, x + 2, 4] for x in range(16)])
    boxes[1::2] += torch.tensor([-1.0, -1.0, 1.0, 1.0])  # the 2nd anchor: same centre, larger
    centers = location_centers(boxes, grids, anchors_per_location)
    assert centers[:, 0].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]


def test_image_without_boxes(fcos):
    features, outputs = _fcos_outputs()
    (cls_maps, reg_maps), background = pgd_value_maps(
        _material(fcos, features, outputs), [_instances([], [])], topk=30,
        quality_alphas=(0.8, 0.6),
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
    levels = model.student.head_in_features  # every head level, p3..p7
    expected = {f"loss_pgd_{kind}_{s}" for s in levels for kind in ("cls", "reg")}
    assert expected <= set(losses)
    assert set(losses) - expected == set(plain)
    assert all(torch.isfinite(v) for v in losses.values())
    assert storage.history("kd/pgd_key_locations_per_gt").latest() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.backbone.parameters())


@pytest.mark.parametrize("config", ["PGD-FCOS-R18.yaml", "PGD-RetinaNet-R18.yaml"])
def test_pgd_imitates_the_first_block_of_each_head_tower(config):
    model = build_seeded(_cfg(config, ["MODEL.DISTILL.INHERIT", "False"])).train()
    batch = make_batch()
    with EventStorage():
        _, inputs = model.distill_inputs(batch)
        pgd = model.distill_losses["PGD"]
        torch.manual_seed(0)
        losses = pgd(inputs)
        pred = inputs.predictions
        for side, model_ in ((pred.student, model.student), (pred.teacher, model.teacher.model)):
            head = model_.head
            features = model_.backbone(
                model.teacher.preprocess(batch, "BGR", inputs.image_size)
                if model_ is model.teacher.model
                else model.student.preprocess_image(batch).tensor
            )
            for i, level in enumerate(model_.head_in_features):
                with torch.no_grad():
                    assert torch.allclose(side.cls_taps[i], head.cls_subnet[:3](features[level]))
                    assert torch.allclose(side.reg_taps[i], head.bbox_subnet[:3](features[level]))
        # The FPN maps are no longer what PGD compares: changing them changes nothing ...
        inputs.student_features = [torch.randn_like(x) for x in inputs.student_features]
        inputs.teacher_features = [torch.randn_like(x) for x in inputs.teacher_features]
        torch.manual_seed(0)
        same = pgd(inputs)
        # ... while the tower taps are what it compares.
        pred.student.cls_taps[0] = pred.teacher.cls_taps[0].clone()
        pred.student.reg_taps[0] = pred.teacher.reg_taps[0].clone()
        torch.manual_seed(0)
        changed = pgd(inputs)
    assert all(torch.equal(losses[k], same[k]) for k in losses)
    level = model.student.head_in_features[0]
    assert changed[f"loss_pgd_reg_{level}"] == 0
    assert changed[f"loss_pgd_cls_{level}"] < losses[f"loss_pgd_cls_{level}"]


def test_teacher_on_other_head_levels_is_refused():
    cfg = _cfg("PGD-FCOS-R18.yaml")
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.FCOS.IN_FEATURES", "['p4', 'p5', 'p6', 'p7']"]
    with pytest.raises(ValueError, match="location by location"):
        build_seeded(cfg)


def test_other_tower_width_is_an_error():
    cfg = _cfg("PGD-FCOS-R18.yaml", ["MODEL.DISTILL.INHERIT", "False"])
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.FPN.OUT_CHANNELS", "32"]
    model = build_seeded(cfg).train()
    with EventStorage(), pytest.raises(ValueError, match="same tower width"):
        model(make_batch())
