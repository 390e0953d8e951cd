"""PKD: RetinaNet R50 student <- Mask R-CNN Swin-S teacher, 2x schedule.
LazyConfig twin of PKD-RetinaNet-R50-SwinS-MaskRCNN-2x.yaml.

Published (COCO val2017 box AP): teacher 48.2, baseline 37.4 -> KD 41.5.
  (arXiv 2207.02039; MMRazor's pkd_fpn_mask_rcnn_swin_retina_r50_2x_coco.)
Student p3..p6 <-> teacher p2..p5 by index (each student map upsampled x2 to the teacher's),
Pearson-correlation imitation with weight 6; the student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-R50-SwinS-MaskRCNN-2x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "RetinaNet",
    "MaskRCNN-SwinS-FPN-3x.py",
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/pkd_retinanet_r50_swins_maskrcnn_2x_lazy"
