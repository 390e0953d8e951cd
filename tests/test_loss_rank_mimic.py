import copy
import os

import pytest
import torch
from torch.nn import functional as F

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from pkd.config import get_distill_cfg
from pkd.losses import DISTILL_LOSS_REGISTRY, DensePredictions, DistillInputs
from pkd.losses.rank_mimic import (  # registers "RM" and "PFI"
    PFILoss,
    RankMimicLoss,
    matched_gt_indices,
    pfi_loss,
    rank_mimic_loss,
)
from pkd.meta_arch import student_config

from pkd_testing import (
    DEMO,
    TEACHER_YAML,
    TINY_INPUT,
    TINY_TEACHER_OPTS,
    build_seeded,
    make_batch,
)

LEVELS = ["p3", "p4", "p5", "p6"]


def _cfg(losses=("RM", "PFI"), opts=()):
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(DEMO, "RM-PFI-RetinaNet-R18.yaml"))
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "random"
    cfg.MODEL.DISTILL.LOSSES = list(losses)
    cfg.merge_from_list(TINY_INPUT + list(opts))
    return cfg


@pytest.fixture(scope="module")
def retinas():
    """Two plain demo RetinaNets (student, teacher) with different random weights."""
    cfg = student_config(_cfg())
    return build_seeded(cfg, 0).train(), build_seeded(cfg, 1).eval()


def _dense_inputs(student, teacher, batch, teacher_outputs=None):
    """DistillInputs as DistillMetaArch makes them, from hand-run backbones and heads."""
    images = student.preprocess_image(batch).tensor
    fs = student.backbone(images)
    with torch.no_grad():
        ft = teacher.backbone(teacher.preprocess_image(batch).tensor)
        head_t = teacher.head([ft[f] for f in teacher.head_in_features])
    head_s = student.head([fs[f] for f in student.head_in_features])
    return DistillInputs(
        levels=LEVELS,
        student_features=[fs[l] for l in LEVELS],
        teacher_features=[ft[l] for l in LEVELS],
        gt_instances=[x["instances"] for x in batch],
        image_size=tuple(images.shape[-2:]),
        predictions=DensePredictions(
            student=student,
            teacher=teacher,
            student_features=[fs[f] for f in student.head_in_features],
            teacher_features=[ft[f] for f in teacher.head_in_features],
            student_outputs=head_s,
            teacher_outputs=teacher_outputs(head_s) if teacher_outputs else head_t,
        ),
    )


def _same_as_student(head_outputs):
    return [[x.detach().clone() for x in level] for level in head_outputs]


# -- RM ------------------------------------------------------------------------------------------


def test_rank_mimic_loss_by_hand():
    s = torch.tensor([1.0, 2.0, 0.5, 3.0, -1.0], requires_grad=True)
    t = torch.tensor([2.0, 1.0, 0.0, 5.0, 4.0], requires_grad=True)
    groups = torch.tensor([0, 0, 0, 1, 2])  # GTs 1 and 2 have a single positive: skipped
    loss, count = rank_mimic_loss(s, t, groups, temperature=2.0)
    p_t, log_p_s = F.softmax(t[:3] / 2, 0), F.log_softmax(s[:3] / 2, 0)
    expected = (p_t * (p_t.log() - log_p_s)).sum()
    assert count == 1 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert s.grad[:3].abs().sum() > 0 and (s.grad[3:] == 0).all() and t.grad is None


def test_rank_mimic_loss_zero_for_equal_scores_and_for_no_group():
    s = torch.randn(6)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    loss, count = rank_mimic_loss(s, s + 3.0, groups)  # a shift keeps the ranking distribution
    assert count == 2 and loss.item() == pytest.approx(0.0, abs=1e-7)
    loss, count = rank_mimic_loss(s[:0], s[:0], groups[:0])
    assert count == 0 and loss.item() == 0.0


def test_matched_gt_indices_recovers_the_assignment():
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 30, 30], [5, 5, 30, 30]]))
    inst.gt_classes = torch.tensor([1, 0, 2])
    labels = torch.tensor([1, 3, 0, 2, -1, 0])  # 3 = background, -1 = ignored
    boxes = inst.gt_boxes.tensor[[0, 0, 1, 2, 1, 1]]
    assert matched_gt_indices(labels, boxes, inst, 3).tolist() == [0, -1, 1, 2, -1, 1]


def test_rm_zero_when_logits_agree_positive_otherwise(retinas):
    student, teacher = retinas
    batch = make_batch()  # the second image has no boxes
    rm = RankMimicLoss(weight=4.0)
    with EventStorage() as storage:
        same = rm(_dense_inputs(student, copy.deepcopy(student), batch, _same_as_student))
        assert same["loss_rm"].item() == pytest.approx(0.0, abs=1e-6)
        differ = rm(_dense_inputs(student, teacher, batch))["loss_rm"]
        assert differ.item() > 0 and storage.history("kd/rm_num_gts").latest() > 0
    differ.backward()
    assert student.head.cls_score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_rm_skips_gts_with_fewer_than_two_positives(retinas):
    student, teacher = retinas
    batch = make_batch(sizes=((80, 96),), boxes_per_image=(1,))
    # A thin 2x20 box centred on an anchor centre: only its best anchor (IoU < 0.4, a low-quality
    # match) is positive.
    batch[0]["instances"].gt_boxes = Boxes(torch.tensor([[47.0, 30.0, 49.0, 50.0]]))
    inputs = _dense_inputs(student, teacher, batch)
    anchors = student.anchor_generator(inputs.predictions.student_features)
    labels, _ = student.label_anchors(anchors, inputs.gt_instances)
    assert int(((labels[0] >= 0) & (labels[0] < student.num_classes)).sum()) == 1
    with EventStorage() as storage:
        loss = RankMimicLoss()(inputs)["loss_rm"]
    assert loss.item() == 0.0 and storage.history("kd/rm_num_gts").latest() == 0


# -- PFI -----------------------------------------------------------------------------------------


def test_pfi_zero_when_predictions_agree(retinas):
    student, _ = retinas
    inputs = _dense_inputs(student, copy.deepcopy(student).eval(), make_batch(), _same_as_student)
    with EventStorage():
        losses = PFILoss(weight=1.5)(inputs)
    assert sorted(losses) == sorted(f"loss_pfi_{l}" for l in LEVELS)
    assert all(v.item() == 0.0 for v in losses.values())


def test_pfi_by_hand_and_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    ps = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    pt = torch.randn(2, 6, 5, 7, generator=g)
    loss = pfi_loss(s, t, ps, pt)
    d_pred = (ps.sigmoid() - pt.sigmoid()).square().mean(1)
    expected = (d_pred * (s - t).square().mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None and ps.grad is None  # D_pred is a weight


def test_pfi_adapter_for_different_channels(retinas):
    student, teacher = retinas
    pfi = PFILoss(channels={"p3": (64, 64), "p4": (64, 32)})
    assert PFILoss.has_adapter and list(pfi.adapters) == ["p4"]
    inputs = _dense_inputs(student, teacher, make_batch())
    inputs.levels, inputs.student_features = ["p4"], inputs.student_features[1:2]
    inputs.teacher_features = [inputs.teacher_features[1][:, :32]]
    with EventStorage():
        loss = pfi(inputs)["loss_pfi_p4"]
    loss.backward()
    assert torch.isfinite(loss) and pfi.adapters["p4"].weight.grad.abs().sum() > 0


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
