"""PGD: FCOS R50 student <- FCOS R101 (3x, multi-scale) teacher, 1x schedule.
LazyConfig twin of PGD-FCOS-R50-R101-FCOS3x-1x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 43.1, baseline 38.2 -> KD 42.5.
  (arXiv 2203.05469; the authors' work_configs/pgd_fcos_r101_r50_1x.py.)
All five levels p3..p7 <-> p3..p7 (the authors distil every head level, weighted 1.0..2.0), the
FCOS hyper-parameters, gradients clipped at norm 35, and the student's FPN and head initialised
from the teacher (inheriting). The authors train with 4 images x 8 GPUs at lr 0.02; batch 16 at
lr 0.01 is the same linear-scaling recipe over the same 12 epochs.

  tools/train_net.py --config-file configs/COCO/PGD-FCOS-R50-R101-FCOS3x-1x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses.pgd import PGDLoss

from .common.recipe import clip_gradients, dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "FCOS",
    "FCOS-R101-3x.yaml",
    {
        "PGD": L(PGDLoss)(
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
    },
    num_levels=5,
    inherit=True,
    head=True,
)

optimizer.lr = 0.01
clip_gradients(optimizer, max_norm=35.0)
lr_multiplier = lr_schedule(1)
train.max_iter = 90000
train.output_dir = "output/coco/pgd_fcos_r50_r101_fcos3x_1x_lazy"
