"""RM + PFI: RetinaNet R50 student <- RetinaNet X101-64x4d teacher, 2x schedule.
LazyConfig twin of RM-PFI-RetinaNet-R50-X101-RetinaNet-2x.yaml (the teacher is the same yacs
config).

Published (COCO val2017 box AP): teacher n/a, baseline 36.9 -> KD 40.4.
  (arXiv 2112.04840 distils from a RetinaNet with a larger backbone; no official code or config
  exists. Our choice of teacher: the RetinaNet X101-64x4d of the PKD/FGD rows, 41.0, which has the
  student's anchors per location as RM and PFI require.)
Rank mimicking (weight 4, temperature 1) and prediction-guided feature imitation (weight 1.5) on
all five head levels p3..p7 <-> p3..p7 (our choice: PFI is defined per head level); the student
starts from ImageNet (no inheriting, none in the paper); no gradient clipping.

  tools/train_net.py --config-file configs/COCO/RM-PFI-RetinaNet-R50-X101-RetinaNet-2x.py \
      --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses.rank_mimic import PFILoss, RankMimicLoss

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "RetinaNet",
    "RetinaNet-X101-64x4d-1x.yaml",
    {
        "RM": L(RankMimicLoss)(weight=4.0, temperature=1.0),
        "PFI": L(PFILoss)(weight=1.5),  # equal FPN channels: no adapters
    },
    num_levels=5,
    head=True,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/rm_pfi_retinanet_r50_x101_retinanet_2x_lazy"
