"""LazyConfig twin of FGD-RetinaNet-R18.yaml: FGD (its defaults, the RetinaNet recipe) from the
Faster R-CNN R18 teacher, student FPN inherited from the teacher where shapes match."""
from detectron2.config import LazyCall as L

from pkd.losses import MultiLevelFGDLoss

from .common.demo import CHANNELS, dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"FGD": L(MultiLevelFGDLoss)(channels=[(CHANNELS, CHANNELS)] * 4)},
    "FasterRCNN-R18-teacher.yaml",
    "output/demo/teacher/model_final.pth",
    inherit=True,
)
train.output_dir = "output/demo/student_fgd_lazy"
