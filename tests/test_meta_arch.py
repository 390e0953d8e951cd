import copy
import os

import pytest
import torch

from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from pkd.meta_arch import student_config
from pkd.teacher import FrozenTeacher, TeacherCheckpointError, load_teacher

from pkd_testing import DEMO, TEACHER_YAML, TINY_INPUT, TINY_TEACHER_OPTS, build_seeded, distill_cfg, make_batch


@pytest.fixture(scope="module")
def retina_distill():
    return build_seeded(distill_cfg("RetinaNet", TINY_INPUT))


@pytest.mark.parametrize("student", ["RetinaNet", "FCOS", "GeneralizedRCNN"])
def test_training_step_returns_student_and_kd_losses(student):
    model = build_seeded(distill_cfg(student, TINY_INPUT))
    model.train()
    with EventStorage() as storage:
        losses = model(make_batch())
        plain = model.student(make_batch())
        sum(losses.values()).backward()
    kd = sorted(k for k in losses if k.startswith("loss_pkd_"))
    levels = [s for s, _ in model.feature_pairs]
    assert kd == sorted(f"loss_pkd_{s}" for s in levels)
    assert set(losses) - set(kd) == set(plain)
    assert all(torch.isfinite(v) for v in losses.values())
    for level in levels:
        assert -1.0 <= storage.history(f"kd/pcc_{level}").latest() <= 1.0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.backbone.parameters())


def test_default_pairs_follow_the_published_recipe(retina_distill):
    # RetinaNet p3..p6 <-> Faster R-CNN p2..p5
    assert retina_distill.feature_pairs == [("p3", "p2"), ("p4", "p3"), ("p5", "p4"), ("p6", "p5")]


def test_explicit_pairs():
    cfg = distill_cfg("RetinaNet", TINY_INPUT)
    cfg.MODEL.DISTILL.FEATURE_PAIRS = [["p3", "p3"], ["p5", "p5"]]
    model = build_model(cfg)
    assert model.feature_pairs == [("p3", "p3"), ("p5", "p5")]
    with EventStorage():
        losses = model.train()(make_batch())
    assert {"loss_pkd_p3", "loss_pkd_p5"} <= set(losses) and "loss_pkd_p4" not in losses


def test_teacher_is_frozen_by_construction(retina_distill):
    teacher = retina_distill.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    retina_distill.train()
    assert retina_distill.student.training and not teacher.training
    assert not any(m.training for m in teacher.modules())


def test_teacher_unchanged_by_training_and_not_in_optimizer():
    cfg = distill_cfg("RetinaNet", TINY_INPUT + ["SOLVER.BASE_LR", "0.1"])
    model = build_seeded(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.teacher.parameters()}
    assert {id(p) for p in model.student.parameters()} <= in_optimizer
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    student_before = copy.deepcopy(model.student.state_dict())
    model.train()
    with EventStorage():
        for step in range(2):
            losses = model(make_batch(seed=step))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        model(make_batch())
    model.train()
    assert not model.teacher.training
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())


def test_zero_weight_gives_exactly_the_plain_student(retina_distill):
    cfg = distill_cfg("RetinaNet", TINY_INPUT + ["MODEL.DISTILL.PKD.WEIGHT", "0.0"])
    model = build_seeded(cfg).train()
    plain = copy.deepcopy(model.student)
    batch = make_batch()
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
        plain_losses = plain(batch)
        sum(plain_losses.values()).backward()
    for k, v in plain_losses.items():
        assert torch.equal(losses[k], v), k
    assert all(losses[k].item() == 0 for k in losses if k.startswith("loss_pkd"))
    for (name, p), q in zip(model.student.named_parameters(), plain.parameters()):
        if q.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_inference_is_the_students(retina_distill):
    retina_distill.eval()
    batch = make_batch()
    with torch.no_grad():
        out = retina_distill(batch)
        ref = retina_distill.student(batch)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


@pytest.mark.parametrize("student_format,teacher_format", [("BGR", "BGR"), ("BGR", "RGB"), ("RGB", "BGR")])
def test_teacher_preprocessing_equals_its_own(student_format, teacher_format):
    opts = TINY_TEACHER_OPTS + ["INPUT.FORMAT", teacher_format, "MODEL.PIXEL_MEAN", "[120.0, 110.0, 100.0]"]
    teacher = load_teacher(TEACHER_YAML, "random", opts)
    batch = make_batch(sizes=((61, 77), (50, 93)))
    for_student = [dict(x) for x in batch]
    if student_format != teacher_format:
        for x in for_student:
            x["image"] = x["image"].flip(0)
    ref = teacher.model.preprocess_image(batch).tensor
    ours = teacher.preprocess(for_student, student_format, tuple(ref.shape[-2:]))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5)


def test_teacher_input_padded_to_the_students_size():
    teacher = load_teacher(TEACHER_YAML, "random", TINY_TEACHER_OPTS)
    batch = make_batch(sizes=((61, 77), (50, 93)))
    out = teacher.preprocess(batch, "BGR", (128, 160))
    assert out.shape[-2:] == (128, 160)
    assert out[..., 96:, :].abs().sum() == 0  # beyond the images: zero padding


# -- bad input ---------------------------------------------------------------------------------


def test_missing_teacher_weights_file():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.TEACHER.WEIGHTS", "no/such/teacher.pth"])
    with pytest.raises(TeacherCheckpointError, match="no/such/teacher.pth.*does not exist"):
        build_model(cfg)


def test_empty_teacher_weights_is_an_error():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.TEACHER.WEIGHTS", ""])
    with pytest.raises(TeacherCheckpointError, match="WEIGHTS is empty"):
        build_model(cfg)


def test_teacher_checkpoint_of_another_model(tmp_path):
    # A RetinaNet checkpoint does not cover a Faster R-CNN teacher: refuse, name the keys.
    retina = build_model(student_config(distill_cfg("RetinaNet")))
    path = str(tmp_path / "retinanet.pth")
    torch.save({"model": retina.state_dict()}, path)
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.TEACHER.WEIGHTS", path])
    with pytest.raises(TeacherCheckpointError, match=r"retinanet.pth.*not in the checkpoint.*backbone.fpn_lateral2"):
        build_model(cfg)


def test_teacher_checkpoint_with_wrong_shapes(tmp_path):
    teacher = load_teacher(TEACHER_YAML, "random", TINY_TEACHER_OPTS + ["MODEL.FPN.OUT_CHANNELS", "32"])
    path = str(tmp_path / "teacher5.pth")
    torch.save({"model": teacher.model.state_dict()}, path)
    with pytest.raises(TeacherCheckpointError, match="wrong shape"):
        load_teacher(TEACHER_YAML, path, TINY_TEACHER_OPTS)


def test_teacher_parts_that_do_not_run_may_be_missing(tmp_path):
    # PKD runs the teacher's backbone+FPN only: a backbone-only checkpoint (as converted from
    # other frameworks) is enough; the backbone itself must be complete.
    teacher = load_teacher(TEACHER_YAML, "random", TINY_TEACHER_OPTS)
    state = {k: v for k, v in teacher.model.state_dict().items() if k.startswith("backbone.")}
    path = str(tmp_path / "backbone_only.pth")
    torch.save({"model": state}, path)
    loaded = load_teacher(TEACHER_YAML, path, TINY_TEACHER_OPTS)
    assert torch.equal(loaded.model.backbone.fpn_lateral2.weight, teacher.model.backbone.fpn_lateral2.weight)
    del state["backbone.fpn_output5.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(TeacherCheckpointError, match="backbone.fpn_output5.weight"):
        load_teacher(TEACHER_YAML, path, TINY_TEACHER_OPTS)
    with pytest.raises(TeacherCheckpointError, match="roi_heads"):
        load_teacher(TEACHER_YAML, path, TINY_TEACHER_OPTS, required_parts=("backbone", "roi_heads"))


def test_teacher_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(3)
    teacher = load_teacher(TEACHER_YAML, "random", TINY_TEACHER_OPTS)
    path = str(tmp_path / "teacher.pth")
    torch.save({"model": teacher.model.state_dict()}, path)
    loaded = load_teacher(TEACHER_YAML, path, TINY_TEACHER_OPTS)
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_pair_with_unknown_level():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.FEATURE_PAIRS", "[['p3', 'p9']]"])
    with pytest.raises(ValueError, match=r"\(p3, p9\).*does not exist.*teacher levels"):
        build_model(cfg)


def test_too_many_levels_by_index():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.NUM_LEVELS", "6"])
    with pytest.raises(ValueError, match="NUM_LEVELS=6"):
        build_model(cfg)


def test_channel_mismatch_without_adapter():
    cfg = distill_cfg("RetinaNet")
    cfg.MODEL.DISTILL.TEACHER.OPTS = TINY_TEACHER_OPTS + ["MODEL.FPN.OUT_CHANNELS", "32"]
    with pytest.raises(ValueError, match="Student level p3 has 64 channels but teacher level p2 has 32"):
        build_model(cfg)


def test_unsupported_student_kind():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.STUDENT_ARCH", "SemanticSegmentor",
                                    "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['p3']"])
    with pytest.raises(TypeError, match="Unsupported student SemanticSegmentor.*RetinaNet.*FCOS.*GeneralizedRCNN"):
        build_model(cfg)


def test_unknown_loss_lists_registered_ones():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.LOSSES", "['PDK']"])
    with pytest.raises(KeyError, match=r"Unknown distillation loss 'PDK'.*'PKD'"):
        build_model(cfg)


def test_missing_teacher_config():
    cfg = distill_cfg("RetinaNet", ["MODEL.DISTILL.TEACHER.CONFIG", "nowhere/teacher.yaml"])
    with pytest.raises(FileNotFoundError, match="nowhere/teacher.yaml"):
        build_model(cfg)


def test_teacher_config_resolves_relative_to_the_config_file():
    cfg = distill_cfg("RetinaNet")
    assert cfg.MODEL.DISTILL.TEACHER.CONFIG == TEACHER_YAML


def test_frozen_teacher_rejects_non_detectors():
    with pytest.raises(TypeError, match="backbone"):
        FrozenTeacher(torch.nn.Linear(2, 2), weights="random")


def test_dense_material_is_computed_once_per_step(monkeypatch):
    cfg = distill_cfg("RetinaNet", TINY_INPUT + ["MODEL.DISTILL.LOSSES", "['PKD', 'RM']"])
    cfg.MODEL.DISTILL.TEACHER.CONFIG = os.path.join(DEMO, "RetinaNet-R18-teacher.yaml")
    cfg.MODEL.DISTILL.TEACHER.OPTS = []
    model = build_seeded(cfg).train()
    calls = []
    original = type(model.student).label_anchors

    def counted(self, anchors, gt_instances):
        calls.append(len(gt_instances))
        return original(self, anchors, gt_instances)

    monkeypatch.setattr(type(model.student), "label_anchors", counted)
    with EventStorage():
        losses = model(make_batch())
    assert calls == [2]  # the student's own training forward; RM reuses its assignment
    assert "loss_rm" in losses and "label_anchors" not in vars(model.student)
