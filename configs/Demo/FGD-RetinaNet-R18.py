"""LazyConfig twin of FGD-RetinaNet-R18.yaml: FGD (its defaults, the RetinaNet recipe) from the
Faster R-CNN R18 teacher; no inheriting (student p3 learns from teacher p2)."""
from detectron2.config import LazyCall as L

from pkd.losses import MultiLevelFGDLoss

from .common.demo import CHANNELS, dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"FGD": L(MultiLevelFGDLoss)(channels=[(CHANNELS, CHANNELS)] * 4)},
    "Demo/FasterRCNN-R18-teacher.yaml",
    "output/demo/teacher/model_final.pth",
)
train.output_dir = "output/demo/student_fgd_lazy"
