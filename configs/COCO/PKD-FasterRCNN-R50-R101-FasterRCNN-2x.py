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
from collections import OrderedDict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher

from .common.recipe import dataloader, lr_schedule, optimizer, train

model = L(DistillMetaArch)(
    student=model_zoo.get_config("common/models/mask_rcnn_fpn.py").model,
    teacher=L(load_teacher)(
        config="teachers/FasterRCNN-R101-FPN-2x.yaml",
        # MMDetection's Faster R-CNN R101 converted by tools/convert_teacher.py (see the teacher
        # config for the source checkpoint); the path is relative to the working directory.
        weights="output/teachers/faster_rcnn_r101_2x.pth",
        device="${...train.device}",
    ),
    # {name: loss module}; a LazyCall, because instantiate() does not descend into plain dicts.
    losses=L(OrderedDict)(PKD=L(PKDLoss)(weight=6.0, resize_student=True)),
    num_levels=4,
    student_input_format="${..dataloader.train.mapper.image_format}",
    inherit=False,
)
model.student.backbone.bottom_up.freeze_at = 2
# Faster R-CNN: Detectron2's Mask R-CNN FPN model without its mask branch.
for _key in ("mask_in_features", "mask_pooler", "mask_head"):
    del model.student.roi_heads[_key]

optimizer.lr = 0.02
lr_multiplier = lr_schedule(2)
train.max_iter = 180000
train.output_dir = "output/coco/pkd_faster_rcnn_r50_r101_faster_rcnn_2x_lazy"
