"""PGD: FCOS R50 student <- FCOS R101 (3x, multi-scale) teacher, 1x schedule.
LazyConfig twin of PGD-FCOS-R50-R101-FCOS3x-1x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 43.1, baseline 38.2 -> KD 42.5.
  (arXiv 2203.05469; the authors' work_configs/pgd_fcos_r101_r50_1x.py.)
All five levels p3..p7 <-> p3..p7 (the authors distil every head level, weighted 1.0..2.0), the
FCOS hyper-parameters, gradients clipped at norm 35, and the student's FPN and head initialised
from the teacher (inheriting). The authors train with 4 images x 8 GPUs at lr 0.02; batch 16 at
lr 0.01 is the same linear-scaling recipe over the same 12 epochs.

Gradient clipping: Detectron2's LazyConfig has no option for it; ``clip_gradients`` (common/
recipe.py) makes the optimizer the clipping SGD subclass that the yacs SOLVER.CLIP_GRADIENTS builds
(each parameter's gradient clipped to norm 35; the authors clip the global norm, which Detectron2
offers in neither config kind). The config saved to the output directory then names that
generated class, which cannot be re-instantiated from the saved file.

  tools/train_net.py --config-file configs/COCO/PGD-FCOS-R50-R101-FCOS3x-1x.py --num-gpus 8
"""
import os
from collections import OrderedDict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from pkd.losses.pgd import PGDLoss
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher

from .common.recipe import clip_gradients, dataloader, lr_schedule, optimizer, train

model = L(DistillMetaArch)(
    student=model_zoo.get_config("common/models/fcos.py").model,
    teacher=L(load_teacher)(
        config="teachers/FCOS-R101-3x.yaml",
        # The authors' FCOS R101 3x converted by tools/convert_teacher.py (see the teacher config);
        # the path is relative to the working directory.
        weights="output/teachers/fcos_r101_3x.pth",
        device="${...train.device}",
        # PGD reads the teacher's dense head: its checkpoint must cover the head too.
        required_parts=("backbone", "head"),
    ),
    # {name: loss module}; a LazyCall, because instantiate() does not descend into plain dicts.
    losses=L(OrderedDict)(
        PGD=L(PGDLoss)(
            temperature=0.8,
            alpha=0.04,
            beta=0.02,  # 0.5 x alpha
            gamma=0.064,  # 1.6 x alpha
            delta=0.0008,
            topk=30,
            quality_alpha_cls=0.8,
            quality_alpha_reg=0.6,
            level_weights=[1.0, 1.25, 1.5, 1.75, 2.0],
        )
    ),
    num_levels=5,
    student_input_format="${..dataloader.train.mapper.image_format}",
    inherit=True,
)
model.student.backbone.bottom_up.freeze_at = 2

optimizer.lr = 0.01
clip_gradients(optimizer, max_norm=35.0)
lr_multiplier = lr_schedule(1)
train.max_iter = 90000
train.output_dir = "output/coco/pgd_fcos_r50_r101_fcos3x_1x_lazy"
