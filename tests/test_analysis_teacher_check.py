"""The teacher check: box AP through the distiller's path, the message naming the likely cause,
and the hook that keeps a blind teacher from being trained against."""
import argparse
import os

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from pkd.analysis.teacher_check import (
    BlindTeacherError,
    blind_teacher_message,
    box_ap,
    first_annotated,
)
from pkd.engine import Trainer, lazy_train
from pkd.teacher import load_teacher

from pkd_testing import (
    RETINA_YAML,
    SQUARES,
    SQUARES_MODEL,
    lazy_squares_distill_cfg,
    squares_cfg,
    squares_distill_cfg,
)

TRAIN_ONE = ["SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "0", "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def untrained_teacher(squares, tmp_path_factory):
    """A checkpoint of the teacher's own architecture that loads but detects nothing: its
    initialisation (the prior keeps every score near 0.01)."""
    out = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(squares_cfg()), save_dir=str(out)).save("untrained")
    return str(out / "untrained.pth")


def teacher_ap(weights, student_format="BGR", opts=()):
    teacher = load_teacher(RETINA_YAML, weights, [*SQUARES_MODEL, *opts])
    dicts = DatasetCatalog.get(SQUARES)
    mapper = DatasetMapper(squares_cfg(), is_train=False)  # the BGR student's test mapper
    ap = box_ap(lambda b: teacher.detect(b, student_format), dicts, mapper, SQUARES)["AP"]
    return ap, teacher


def test_squares_teacher_sees_and_a_channel_swap_blinds_it(squares_teacher):
    weights, ap_own = squares_teacher
    ap, _ = teacher_ap(weights)
    assert ap == pytest.approx(ap_own, abs=1e-6)  # the distiller's path = its own evaluation
    swapped, _ = teacher_ap(weights, student_format="RGB")
    # red squares look blue and blue ones red: (next to) nothing is right
    assert ap > 20 and swapped < ap / 4


def test_untrained_checkpoint_detects_nothing(untrained_teacher):
    ap, teacher = teacher_ap(untrained_teacher)
    assert ap == 0.0
    message = blind_teacher_message(teacher, ap, "8 images", SQUARES, swapped_ap=0.0)
    assert "box AP 0.0 on 8 images of pkd_squares" in message
    assert untrained_teacher in message and "PIXEL_MEAN" in message
    assert "'random'" not in message and "fed RGB instead of BGR" not in message


def test_message_names_the_channel_order_and_the_classes(squares_teacher):
    weights, _ = squares_teacher
    ap, teacher = teacher_ap(weights, opts=["INPUT.FORMAT", "RGB"])  # trained with BGR
    swapped, _ = teacher_ap(weights, "RGB", opts=["INPUT.FORMAT", "RGB"])
    message = blind_teacher_message(teacher, ap, "8 images", SQUARES, swapped)
    assert f"fed BGR instead of RGB, the teacher reaches AP {swapped:.1f}" in message
    five = [*SQUARES_MODEL, "MODEL.RETINANET.NUM_CLASSES", "5"]
    teacher = load_teacher(RETINA_YAML, "random", five)
    message = blind_teacher_message(teacher, 0.0, "8 images", SQUARES)
    assert "weights: MODEL.DISTILL.TEACHER.WEIGHTS is 'random'" in message
    assert "the teacher predicts 5 classes, pkd_squares has 2" in message


def test_first_annotated_skips_images_without_boxes():
    dicts = [{"annotations": []}, {"annotations": [{"iscrowd": 1}]}, {"annotations": [{}]},
             {"annotations": [{"iscrowd": 0}]}, {"annotations": [{}]}]
    assert first_annotated(dicts, 2) == [dicts[2], dicts[3]]


def train(cfg):
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def test_trainer_refuses_a_blind_teacher_before_the_first_iteration(untrained_teacher, tmp_path):
    cfg = squares_distill_cfg(untrained_teacher, [*TRAIN_ONE, "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(BlindTeacherError, match="The teacher detects .next to. nothing") as error:
        trainer.train()
    assert "MODEL.DISTILL.CHECK_TEACHER False" in str(error.value)
    assert trainer.iter == 0 and "total_loss" not in trainer.storage.histories()
    assert not os.path.exists(tmp_path / "model_final.pth")


@pytest.mark.parametrize("opts", [["MODEL.DISTILL.CHECK_TEACHER", "False"],
                                  ["MODEL.DISTILL.TEACHER.WEIGHTS", "random"]])
def test_the_key_and_a_random_teacher_skip_the_check(untrained_teacher, tmp_path, opts):
    cfg = squares_distill_cfg(untrained_teacher, [*TRAIN_ONE, "OUTPUT_DIR", str(tmp_path), *opts])
    trainer = train(cfg)
    assert "loss_pkd_p3" in trainer.storage.histories()
    assert os.path.exists(tmp_path / "model_final.pth")


def test_sound_teacher_passes_and_training_is_the_same_as_without_it(squares_teacher, tmp_path):
    losses = []
    for check in ("True", "False"):
        cfg = squares_distill_cfg(squares_teacher[0], [
            *TRAIN_ONE, "SOLVER.MAX_ITER", "2", "INPUT.MIN_SIZE_TRAIN", "(56, 64, 72)",
            "MODEL.DISTILL.CHECK_TEACHER", check, "OUTPUT_DIR", str(tmp_path / check)])
        histories = train(cfg).storage.histories()
        losses.append({k: h.values() for k, h in histories.items() if k.startswith("loss_")})
    # the check draws from the global RNGs (data loader seed, resize choice) and restores them:
    # the same images, augmentations and losses at every iteration
    assert "loss_pkd_p3" in losses[0] and losses[0] == losses[1]


def test_lazy_training_refuses_a_blind_teacher(untrained_teacher, tmp_path):
    cfg = lazy_squares_distill_cfg(untrained_teacher, tmp_path)
    with pytest.raises(BlindTeacherError, match="box AP 0.0 on 8 training images of pkd_squares"):
        lazy_train(argparse.Namespace(resume=False), cfg)
    assert not os.path.exists(tmp_path / "model_final.pth")
    cfg.model.check_teacher = False
    lazy_train(argparse.Namespace(resume=False), cfg)
    assert os.path.exists(tmp_path / "model_final.pth")
