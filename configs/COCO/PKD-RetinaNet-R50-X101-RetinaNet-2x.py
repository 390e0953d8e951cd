"""PKD: RetinaNet R50 student <- RetinaNet X101-64x4d teacher, 2x schedule.
LazyConfig twin of PKD-RetinaNet-R50-X101-RetinaNet-2x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 41.0, baseline 37.4 -> KD 40.8.
  (arXiv 2207.02039; MMRazor's pkd_fpn_retina_x101_retina_r50_2x_coco.)
Student p3..p6 <-> teacher p3..p6 by index, Pearson-correlation imitation with weight 10; the
student starts from ImageNet (no inheriting).

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-R50-X101-RetinaNet-2x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "RetinaNet",
    "RetinaNet-X101-64x4d-1x.yaml",
    {"PKD": L(PKDLoss)(weight=10.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/pkd_retinanet_r50_x101_retinanet_2x_lazy"
