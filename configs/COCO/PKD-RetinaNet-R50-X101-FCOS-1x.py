"""PKD: RetinaNet R50 student <- FCOS X101-64x4d teacher, 1x schedule.
LazyConfig twin of PKD-RetinaNet-R50-X101-FCOS-1x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 42.6, baseline 36.5 -> KD 40.3.
  (arXiv 2207.02039; MMRazor's pkd_fpn_fcos_x101_retina_r50_1x_coco.)
Student p3..p6 <-> teacher p3..p6 by index (same strides), Pearson-correlation imitation with
weight 10; the student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-R50-X101-FCOS-1x.py --num-gpus 8
"""
from collections import OrderedDict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher

from .common.recipe import dataloader, lr_schedule, optimizer, train

model = L(DistillMetaArch)(
    student=model_zoo.get_config("common/models/retinanet.py").model,
    teacher=L(load_teacher)(
        config="teachers/FCOS-X101-64x4d-2x.yaml",
        # MMDetection's FCOS X101-64x4d converted by tools/convert_teacher.py (see the teacher
        # config for the source checkpoint); the path is relative to the working directory.
        weights="output/teachers/fcos_x101_64x4d_2x.pth",
        device="${...train.device}",
    ),
    # {name: loss module}; a LazyCall, because instantiate() does not descend into plain dicts.
    losses=L(OrderedDict)(PKD=L(PKDLoss)(weight=10.0, resize_student=True)),
    num_levels=4,
    student_input_format="${..dataloader.train.mapper.image_format}",
    inherit=False,
)
model.student.backbone.bottom_up.freeze_at = 2

optimizer.lr = 0.01
lr_multiplier = lr_schedule(1)
train.max_iter = 90000
train.output_dir = "output/coco/pkd_retinanet_r50_x101_fcos_1x_lazy"
