"""The LazyConfig node of a DistillMetaArch, shared by the demo's and the COCO recipes' helpers
(``../Demo/common/demo.py``, ``../COCO/common/recipe.py``)."""
from collections import OrderedDict

from detectron2.config import LazyCall as L

from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher


def distill_model(student, teacher_config, teacher_weights, losses, *, num_levels, inherit, head):
    """``L(DistillMetaArch)`` around ``student`` (a LazyCall model).

    Args:
        teacher_config: the teacher's yacs/.py file; teacher_weights: its checkpoint.
        losses: {name: L(LossClass)(...)}.
        num_levels: how many leading (finest) levels of each FPN to pair by index.
        inherit: initialise the student's FPN and head from the teacher where shapes match.
        head: the losses read the teacher's dense head (PGD, RM, PFI), so its checkpoint must
            cover the head too.
    """
    return L(DistillMetaArch)(
        student=student,
        teacher=L(load_teacher)(
            config=teacher_config,
            weights=teacher_weights,
            device="${...train.device}",
            required_parts=["backbone", "head"] if head else ["backbone"],
        ),
        # instantiate() does not descend into plain dicts: build the mapping with L(OrderedDict)
        losses=L(OrderedDict)(**losses),
        num_levels=num_levels,
        inherit=inherit,
        student_input_format="${..dataloader.train.mapper.image_format}",
    )
