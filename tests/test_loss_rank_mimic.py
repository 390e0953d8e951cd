import dataclasses
import os

import pytest
import torch
from torch.nn import functional as F

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from pkd.config import get_distill_cfg
from pkd.losses import DISTILL_LOSS_REGISTRY
from pkd.losses.rank_mimic import (  # registers "RM" and "PFI"
    PFILoss,
    RankMimicLoss,
    pfi_loss,
    rank_mimic_loss,
)
from pkd.students import matched_gt_indices

from pkd_testing import DEMO, TEACHER_YAML, TINY_INPUT, TINY_TEACHER_OPTS, build_seeded, make_batch

LEVELS = ["p3", "p4", "p5", "p6"]


def _cfg(losses=("RM", "PFI"), opts=()):
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(DEMO, "RM-PFI-RetinaNet-R18.yaml"))
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "random"
    cfg.MODEL.DISTILL.LOSSES = list(losses)
    cfg.merge_from_list(TINY_INPUT + list(opts))
    return cfg


@pytest.fixture(scope="module")
def distiller():
    """A RetinaNet-R18 student and a random RetinaNet-R34 teacher, distilled with RM + PFI."""
    return build_seeded(_cfg()).train()


def _inputs(distiller, batch=None, teacher_is_student=False):
    """DistillInputs as DistillMetaArch makes them; optionally with the teacher's material
    replaced by a detached copy of the student's (the two models then agree exactly)."""
    with EventStorage():
        _, inputs = distiller.distill_inputs(batch or make_batch())
    if teacher_is_student:
        detached = {
            f.name: [x.detach() for x in v] if isinstance(v, list) else v.detach()
            for f in dataclasses.fields(inputs.predictions.student)
            if isinstance(getattr(inputs.predictions.student, f.name), (list, torch.Tensor))
            and f.name not in ("levels", "anchors_per_location")
            for v in [getattr(inputs.predictions.student, f.name)]
        }
        inputs.predictions.teacher = dataclasses.replace(inputs.predictions.student, **detached)
        inputs.teacher_features = [x.detach() for x in inputs.student_features]
    return inputs


# -- RM ------------------------------------------------------------------------------------------


def _reference_rm(s, t, groups, images, temperature):
    """RM written out GT by GT and image by image, as rank_mimic_loss documents it."""
    per_image = {}
    for g in groups.unique().tolist():
        members = groups == g
        if int(members.sum()) < 2:
            continue
        p_t = F.softmax(t[members] / temperature, 0)
        log_p_s = F.log_softmax(s[members] / temperature, 0)
        per_image.setdefault(int(images[g]), []).append((p_t * (p_t.log() - log_p_s)).sum())
    means = [torch.stack(v).mean() for v in per_image.values()]
    return torch.stack(means).mean(), sum(len(v) for v in per_image.values())


def test_rank_mimic_loss_against_a_direct_implementation():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(12, generator=g, requires_grad=True)
    t = torch.rand(12, generator=g, requires_grad=True)
    # GTs 0-2 in image 0 (GT 2 has one anchor: skipped), GTs 3-4 in image 1.
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4])
    images = torch.tensor([0, 0, 0, 1, 1])
    loss, count = rank_mimic_loss(s, t, groups, images, temperature=2.0)
    expected, expected_count = _reference_rm(s, t.detach(), groups, images, 2.0)
    assert count == expected_count == 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    s_ref = s.detach().clone().requires_grad_(True)
    expected_ref, _ = _reference_rm(s_ref, t.detach(), groups, images, 2.0)
    expected_ref.backward()
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-7)
    assert s.grad[5] == 0 and t.grad is None  # a lone anchor gets nothing; the teacher no grad


def test_rank_mimic_loss_compares_anchors_in_place_not_sorted():
    s = torch.tensor([0.9, 0.1, 0.5])
    assert rank_mimic_loss(s, s.flip(0), torch.zeros(3, dtype=torch.long))[0] > 0
    loss, count = rank_mimic_loss(s, s, torch.zeros(3, dtype=torch.long))
    assert count == 1 and loss.item() == pytest.approx(0.0, abs=1e-7)


def test_rank_mimic_loss_zero_for_no_group():
    loss, count = rank_mimic_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert count == 0 and loss.item() == 0.0


def test_matched_gt_indices_recovers_the_assignment():
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 30, 30], [5, 5, 30, 30]]))
    inst.gt_classes = torch.tensor([1, 0, 2])
    labels = torch.tensor([1, 3, 0, 2, -1, 0])  # 3 = background, -1 = ignored
    boxes = inst.gt_boxes.tensor[[0, 0, 1, 2, 1, 1]]
    assert matched_gt_indices(labels, boxes, inst, 3).tolist() == [0, -1, 1, 2, -1, 1]


def test_rm_on_the_sigmoid_of_the_gt_class_at_the_students_positives(distiller):
    inputs = _inputs(distiller)  # the second image has no boxes
    pred = inputs.predictions
    with EventStorage() as storage:
        loss = RankMimicLoss(weight=4.0, temperature=1.0)(inputs)["loss_rm"]
        count = storage.history("kd/rm_num_gts").latest()
    # Reference: positives and GT indices straight from the student's own label_anchors.
    anchors = distiller.student.anchor_generator(pred.student.logits)  # reads the grid sizes
    labels, matched = distiller.student.label_anchors(anchors, inputs.gt_instances)
    s, t, groups, images, offset = [], [], [], [], 0
    for n, inst in enumerate(inputs.gt_instances):
        index = matched_gt_indices(labels[n], matched[n], inst, distiller.student.num_classes)
        assert torch.equal(index, pred.matched_gt[n])  # the captured assignment is the student's
        anchor = (index >= 0).nonzero().squeeze(1)
        cls = inst.gt_classes[index[anchor]]
        s.append(pred.student.flat_logits[n, anchor, cls].sigmoid())
        t.append(pred.teacher.flat_logits[n, anchor, cls].sigmoid())
        groups.append(index[anchor] + offset)
        images.append(torch.full((len(inst),), n))
        offset += len(inst)
    # (The formula itself is checked against _reference_rm above; here: what it is applied to.)
    expected, expected_count = rank_mimic_loss(
        torch.cat(s), torch.cat(t), torch.cat(groups), torch.cat(images), 1.0
    )
    assert count == expected_count > 0
    assert loss.item() == pytest.approx(4.0 * expected.item(), rel=1e-6)
    loss.backward()
    assert distiller.student.head.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    distiller.zero_grad()


def test_rm_zero_when_the_models_agree(distiller):
    with EventStorage():
        loss = RankMimicLoss()(_inputs(distiller, teacher_is_student=True))["loss_rm"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rm_skips_gts_with_fewer_than_two_positives(distiller):
    batch = make_batch(sizes=((80, 96),), boxes_per_image=(1,))
    # A thin 2x20 box centred on an anchor centre: only its best anchor (IoU < 0.4, a low-quality
    # match) is positive.
    batch[0]["instances"].gt_boxes = Boxes(torch.tensor([[47.0, 30.0, 49.0, 50.0]]))
    inputs = _inputs(distiller, batch)
    assert int((inputs.predictions.matched_gt[0] >= 0).sum()) == 1
    with EventStorage() as storage:
        loss = RankMimicLoss()(inputs)["loss_rm"]
    assert loss.item() == 0.0 and storage.history("kd/rm_num_gts").latest() == 0


# -- PFI -----------------------------------------------------------------------------------------


def _reference_pfi(s, t, ps, pt):
    """PFI written out image by image, as pfi_loss documents it."""
    per_image = []
    for n in range(s.shape[0]):
        d_pred = ((pt[n] - ps[n]) ** 2).mean(dim=0)  # (H, W)
        d_feat = ((s[n] - t[n]) ** 2).mean(dim=0)
        per_image.append(torch.sqrt(((d_pred * d_feat) ** 2).sum()) / d_pred.numel())
    return torch.stack(per_image).mean()


def test_pfi_against_a_direct_implementation_and_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    ps = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    pt = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    loss = pfi_loss(s, t, ps, pt)
    s_ref, ps_ref = (x.detach().clone().requires_grad_(True) for x in (s, ps))
    expected = _reference_pfi(s_ref, t.detach(), ps_ref, pt.detach())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    # Raw logits, not detached: the gradient reaches the student's logits as well as its map.
    assert ps.grad.abs().sum() > 0 and torch.allclose(ps.grad, ps_ref.grad, atol=1e-8)
    assert torch.allclose(s.grad, s_ref.grad, atol=1e-8)
    assert t.grad is None and pt.grad is None


def test_pfi_zero_when_predictions_agree(distiller):
    inputs = _inputs(distiller, teacher_is_student=True)
    losses = PFILoss(weight=1.5)(inputs)
    assert sorted(losses) == sorted(f"loss_pfi_{l}" for l in LEVELS)
    assert all(v.item() == 0.0 for v in losses.values())


def test_pfi_weight_is_the_mean_over_levels(distiller):
    inputs = _inputs(distiller)
    pred = inputs.predictions
    losses = PFILoss(weight=1.5)(inputs)
    for i, level in enumerate(LEVELS):
        expected = _reference_pfi(
            inputs.student_features[i].detach(), inputs.teacher_features[i],
            pred.student.logits[i].detach(), pred.teacher.logits[i],
        )
        assert losses[f"loss_pfi_{level}"].item() == pytest.approx(
            1.5 / len(LEVELS) * expected.item(), rel=1e-5
        )


def test_pfi_adapter_for_different_channels(distiller):
    pfi = PFILoss(channels={"p3": (64, 64), "p4": (64, 32)})
    assert PFILoss.has_adapter and list(pfi.adapters) == ["p4"]
    inputs = _inputs(distiller)
    inputs.levels, inputs.student_features = ["p4"], inputs.student_features[1:2]
    inputs.teacher_features = [inputs.teacher_features[1][:, :32]]
    loss = pfi(inputs)["loss_pfi_p4"]
    loss.backward()
    assert torch.isfinite(loss) and pfi.adapters["p4"].weight.grad.abs().sum() > 0
    distiller.zero_grad()


# -- in DistillMetaArch --------------------------------------------------------------------------


@pytest.mark.parametrize("losses,per_level", [(("RM", "PFI"), "pfi"), (("PKD", "RM"), "pkd")])
def test_training_step(losses, per_level):
    cfg = _cfg(losses)
    model = build_seeded(cfg).train()
    with EventStorage():
        out = model(make_batch())  # second image has no boxes
        sum(out.values()).backward()
    expected = {"loss_rm"} | {f"loss_{per_level}_{s}" for s, _ in model.feature_pairs}
    assert expected <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.head.cls_score.weight.grad.abs().sum() > 0


def test_registered_from_config():
    cfg = _cfg(opts=["MODEL.DISTILL.RM.WEIGHT", "2.0", "MODEL.DISTILL.PFI.WEIGHT", "0.5"])
    pairing = dict(feature_pairs=[], student_shapes={}, teacher_shapes={})
    assert DISTILL_LOSS_REGISTRY.get("RM")(cfg, **pairing).weight == 2.0
    assert DISTILL_LOSS_REGISTRY.get("PFI")(cfg, **pairing).weight == 0.5


def test_rcnn_teacher_is_rejected():
    cfg = _cfg(["RM"], ["MODEL.DISTILL.TEACHER.CONFIG", TEACHER_YAML])
    cfg.MODEL.DISTILL.TEACHER.OPTS = list(TINY_TEACHER_OPTS)
    cfg.MODEL.DISTILL.FEATURE_PAIRS = [["p3", "p3"]]
    with pytest.raises(TypeError, match="GeneralizedRCNN.*no dense head"):
        build_model(cfg)


@pytest.mark.parametrize("losses", [["RM"], ["PFI"]])
def test_teacher_with_other_anchors_is_rejected(losses):
    cfg = _cfg(losses)
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0]]"]
    message = r"student has \[9, 9, 9, 9, 9\] anchors per location.*teacher \[3, 3, 3, 3, 3\]"
    with pytest.raises(ValueError, match=message):  # at construction, before any training
        build_seeded(cfg)
