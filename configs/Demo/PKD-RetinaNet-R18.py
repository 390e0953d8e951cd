"""LazyConfig twin of PKD-RetinaNet-R18.yaml: the CPU demo's RetinaNet-R18 student distilled with
PKD from the Faster R-CNN R18 teacher (student p3..p6 <-> teacher p2..p5; a yacs teacher config
is fine in a LazyConfig).

  tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-R18.py train.max_iter=100
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from .common.demo import dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    "Demo/FasterRCNN-R18-teacher.yaml",
    "output/demo/teacher/model_final.pth",
)
train.output_dir = "output/demo/student_pkd_lazy"
