"""PKD: RetinaNet R50 student <- FCOS X101-64x4d teacher, 1x schedule.
LazyConfig twin of PKD-RetinaNet-R50-X101-FCOS-1x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 42.6, baseline 36.5 -> KD 40.3.
  (arXiv 2207.02039; MMRazor's pkd_fpn_fcos_x101_retina_r50_1x_coco.)
Student p3..p6 <-> teacher p3..p6 by index (same strides), Pearson-correlation imitation with
weight 10; the student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-R50-X101-FCOS-1x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "RetinaNet",
    "FCOS-X101-64x4d-2x.yaml",
    {"PKD": L(PKDLoss)(weight=10.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(1)
train.max_iter = 90000
train.output_dir = "output/coco/pkd_retinanet_r50_x101_fcos_1x_lazy"
