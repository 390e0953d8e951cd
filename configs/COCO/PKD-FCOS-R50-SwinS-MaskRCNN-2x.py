"""PKD: FCOS R50 student <- Mask R-CNN Swin-S teacher, 2x schedule.
LazyConfig twin of PKD-FCOS-R50-SwinS-MaskRCNN-2x.yaml.

Published (COCO val2017 box AP): teacher n/a, baseline 39.1 -> KD 43.9.
  (arXiv 2207.02039 names a Mask R-CNN Swin teacher without its AP or a config; we use the
  Swin-S one of the RetinaNet row, 48.2.)
Our choice, since no published config exists for this pair: the Swin -> RetinaNet recipe, i.e.
weight 6 and the 2x schedule. Student p3..p6 <-> teacher p2..p5 by index (each student map
upsampled x2 to the teacher's); the student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-FCOS-R50-SwinS-MaskRCNN-2x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "FCOS",
    "MaskRCNN-SwinS-FPN-3x.py",
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/pkd_fcos_r50_swins_maskrcnn_2x_lazy"
