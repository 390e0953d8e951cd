"""The published COCO distillation recipe as LazyConfig pieces, shared by the ``../*.py`` configs
(the LazyConfig twins of ``../Base-*.yaml``): COCO 2017 at single-scale 800 px, batch 16, SGD
(momentum 0.9, weight decay 1e-4), linear warm-up over 500 iterations from 0.001 x lr, 1x / 2x
schedules, the R50-FPN students with their ImageNet init, the converted teachers, optional
gradient clipping, and ``distill(...)`` that puts a student, a teacher and losses together.
"""
import os

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from pkd.solver import ClippedSGD

from ...common.distill import distill_model

# Each teacher config of configs/teachers and its MMDetection checkpoint converted by
# tools/convert_teacher.py (the teacher config names the source checkpoint); the paths are
# relative to the working directory.
TEACHER_WEIGHTS = {
    "MaskRCNN-SwinS-FPN-3x.py": "output/teachers/mask_rcnn_swin_s_3x.pth",
    "RetinaNet-X101-64x4d-1x.yaml": "output/teachers/retinanet_x101_64x4d_1x.pth",
    "FCOS-X101-64x4d-2x.yaml": "output/teachers/fcos_x101_64x4d_2x.pth",
    "FasterRCNN-R101-FPN-2x.yaml": "output/teachers/faster_rcnn_r101_2x.pth",
    "CascadeMaskRCNN-X101-32x4d-DCN-1x.yaml": "output/teachers/cascade_mask_rcnn_x101_dcn_1x.pth",
    "FCOS-R101-3x.yaml": "output/teachers/fcos_r101_3x.pth",
}
# The students: Detectron2's model-zoo R50-FPN detectors (Faster R-CNN is its Mask R-CNN FPN
# model without the mask branch).
STUDENT_MODELS = {
    "RetinaNet": "common/models/retinanet.py",
    "FCOS": "common/models/fcos.py",
    "FasterRCNN": "common/models/mask_rcnn_fpn.py",
}

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
# Single-scale 800 px training, as in the published (MMDetection) recipes.
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)
dataloader.train.total_batch_size = 16  # 2 images x 8 GPUs
# predictions and COCO results next to the checkpoints, as the yacs trainer writes them
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

# SGD, momentum 0.9, weight decay 1e-4 (none on norm layers, as the yacs configs); the configs set
# lr: 0.01 for one-stage students, 0.02 for R-CNN ones.
optimizer = model_zoo.get_config("common/optim.py").SGD

train = model_zoo.get_config("common/train.py").train
# ImageNet init in Detectron2 model-zoo form (MSRA R-50, BGR, caffe-style normalisation).
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"

WARMUP_ITERS = 500


def lr_schedule(num_x: int):
    """1x = 90k iterations at batch 16 (lr x0.1 at 60k, 80k); 2x = 180k (at 120k, 160k); linear
    warm-up over 500 iterations from 0.001 x lr. Set ``train.max_iter = 90000 * num_x`` with it."""
    total = 90000 * num_x
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01],
            milestones=[total - 30000 * num_x, total - 10000 * num_x],
            num_updates=total,
        ),
        warmup_length=WARMUP_ITERS / total,
        warmup_method="linear",
        warmup_factor=0.001,
    )


def clip_gradients(optimizer, max_norm: float) -> None:
    """Clips the joint gradient norm of all parameters at ``max_norm`` before each step, as the
    FGD/PGD recipes (MMDetection ``grad_clip=dict(max_norm=35)``) do: the yacs twins use
    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"``; both go through pkd.solver.ClippedSGD."""
    optimizer._target_ = ClippedSGD
    optimizer.max_grad_norm = max_norm


def zoo_student(kind: str):
    """The model-zoo R50-FPN student ``kind`` (a key of STUDENT_MODELS), its stem and res2 frozen
    as in the zoo's ImageNet-initialised recipes."""
    model = model_zoo.get_config(STUDENT_MODELS[kind]).model
    model.backbone.bottom_up.freeze_at = 2
    if kind == "FasterRCNN":
        for key in ("mask_in_features", "mask_pooler", "mask_head"):
            del model.roi_heads[key]
    return model


def distill(student, teacher, losses, *, num_levels, inherit=False, head=False):
    """A DistillMetaArch config around ``student`` (a key of STUDENT_MODELS, or a LazyCall
    model), distilled from ``teacher`` (a key of TEACHER_WEIGHTS: a file in configs/teachers,
    named relative to configs/ as every shipped config names its teacher); the other arguments:
    see ``configs/common/distill.py``."""
    return distill_model(
        zoo_student(student) if isinstance(student, str) else student,
        f"teachers/{teacher}",
        TEACHER_WEIGHTS[teacher],
        losses,
        num_levels=num_levels,
        inherit=inherit,
        head=head,
    )
