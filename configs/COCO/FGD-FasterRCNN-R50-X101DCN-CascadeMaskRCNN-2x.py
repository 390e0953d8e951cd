"""FGD: Faster R-CNN R50 student <- Cascade Mask R-CNN X101-32x4d-DCN teacher, 2x schedule.
LazyConfig twin of FGD-FasterRCNN-R50-X101DCN-CascadeMaskRCNN-2x.yaml (the teacher is the same yacs
config).

Published (COCO val2017 box AP): teacher 47.3, baseline 38.4 -> KD 42.0.
  (arXiv 2111.11837; the authors' fgd_cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x
  _coco.)
Student p2..p5 <-> teacher p2..p5 by index, the R-CNN hyper-parameters and gradients clipped at
norm 35. No inheriting: unlike the authors' RetinaNet config, this one does not set init_student.

  tools/train_net.py --config-file configs/COCO/FGD-FasterRCNN-R50-X101DCN-CascadeMaskRCNN-2x.py \
      --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import MultiLevelFGDLoss

from .common.recipe import clip_gradients, dataloader, distill, lr_schedule, optimizer, train

model = distill(
    "FasterRCNN",
    "CascadeMaskRCNN-X101-32x4d-DCN-1x.yaml",
    {
        "FGD": L(MultiLevelFGDLoss)(
            channels=[(256, 256)] * 4,  # (student, teacher) FPN channels of each pair
            temperature=0.5,
            alpha=0.00005,
            beta=0.000025,
            gamma=0.00005,
            lambda_=0.0000005,
        )
    },
    num_levels=4,
)

optimizer.lr = 0.02
clip_gradients(optimizer, max_norm=35.0)
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/fgd_faster_rcnn_r50_x101dcn_cascade_mask_rcnn_2x_lazy"
