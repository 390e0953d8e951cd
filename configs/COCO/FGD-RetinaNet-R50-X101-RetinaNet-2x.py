"""FGD: RetinaNet R50 student <- RetinaNet X101-64x4d teacher, 2x schedule.
LazyConfig twin of FGD-RetinaNet-R50-X101-RetinaNet-2x.yaml (the teacher is the same yacs config).

Published (COCO val2017 box AP): teacher 41.0, baseline 37.4 -> KD 40.7.
  (arXiv 2111.11837; the authors' fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.)
All five levels p3..p7 <-> p3..p7 (the authors distil every FPN output of RetinaNet), the RetinaNet
hyper-parameters, gradients clipped at norm 35, and the student's FPN and head initialised from the
teacher (inheriting), as the authors' config does.

  tools/train_net.py --config-file configs/COCO/FGD-RetinaNet-R50-X101-RetinaNet-2x.py --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import MultiLevelFGDLoss

from .common.recipe import clip_gradients, dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "RetinaNet",
    "RetinaNet-X101-64x4d-1x.yaml",
    {
        "FGD": L(MultiLevelFGDLoss)(
            channels=[(256, 256)] * 5,  # (student, teacher) FPN channels of each pair
            temperature=0.5,
            alpha=0.001,
            beta=0.0005,
            gamma=0.0005,
            lambda_=0.000005,
        )
    },
    num_levels=5,
    inherit=True,
)

optimizer.lr = 0.01
clip_gradients(optimizer, max_norm=35.0)
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/fgd_retinanet_r50_x101_retinanet_2x_lazy"
