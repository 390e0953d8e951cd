"""PKD: Faster R-CNN R50 student <- Faster R-CNN R101 teacher, 2x schedule.
LazyConfig twin of PKD-FasterRCNN-R50-R101-FasterRCNN-2x.yaml (the teacher is the same yacs
config).

Published (COCO val2017 box AP): teacher 39.8, baseline 38.4 -> KD 40.4.
  (arXiv 2207.02039; MMRazor's pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.)
Student p2..p5 <-> teacher p2..p5 by index, Pearson-correlation imitation with weight 6; the
student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-FasterRCNN-R50-R101-FasterRCNN-2x.py \
      --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "FasterRCNN",
    "FasterRCNN-R101-FPN-2x.yaml",
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.02
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/pkd_faster_rcnn_r50_r101_faster_rcnn_2x_lazy"
