"""FrozenTeacher.detect: the teacher's own inference pieces on the distiller's input."""
import os

import pytest
import torch

from pkd.teacher import load_teacher

from pkd_testing import DEMO, TEACHER_YAML, TINY_INPUT, TINY_TEACHER_OPTS, make_batch

TEACHERS = {
    # RetinaNet with every box kept: a random head scores ~0.01
    "RetinaNet": (os.path.join(DEMO, "RetinaNet-R18.yaml"),
                  ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]),
    "GeneralizedRCNN": (TEACHER_YAML, TINY_TEACHER_OPTS),
}


def as_inputs(batch, flip=False):
    """Test-time inputs: images only (channels reversed with ``flip``), output size = input."""
    return [{"image": x["image"].flip(0) if flip else x["image"], "height": x["height"],
             "width": x["width"]} for x in batch]


@pytest.fixture(scope="module")
def teachers():
    built = {}
    for kind, (config, opts) in TEACHERS.items():
        torch.manual_seed(0)
        built[kind] = load_teacher(config, "random", [*TINY_INPUT, *opts])
    return built


@pytest.mark.parametrize("kind", sorted(TEACHERS))
@pytest.mark.parametrize("student_format", ["BGR", "RGB"])
def test_detect_equals_the_teachers_own_inference(teachers, kind, student_format):
    teacher = teachers[kind]
    assert type(teacher.model).__name__ == kind and teacher.input_format == "BGR"
    batch = make_batch(sizes=((64, 88), (72, 64)))
    own = teacher.model(as_inputs(batch))  # its own path: BGR images, its own preprocessing
    # the distiller's path: the student's images in the student's channel order
    got = teacher.detect(as_inputs(batch, flip=student_format == "RGB"), student_format)
    assert sum(len(r["instances"]) for r in own) > 0
    for a, b in zip(own, got):
        a, b = a["instances"], b["instances"]
        assert a.image_size == b.image_size
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor)
        torch.testing.assert_close(b.scores, a.scores)
        assert torch.equal(b.pred_classes, a.pred_classes)


def test_detect_rescales_to_the_requested_output_size(teachers):
    teacher = teachers["GeneralizedRCNN"]
    inputs = as_inputs(make_batch(sizes=((64, 88),)))
    inputs[0].update(height=128, width=176)
    (result,) = teacher.detect(inputs, "BGR")
    assert result["instances"].image_size == (128, 176)
    boxes = result["instances"].pred_boxes.tensor
    assert boxes[:, 2].max() > 88 and boxes[:, 2].max() <= 176
