"""LazyConfig twin of FGD-RetinaNet-R18.yaml: FGD (RetinaNet recipe values) from the Faster R-CNN
R18 teacher; no inheriting (student p3 learns from teacher p2)."""
from detectron2.config import LazyCall as L

from pkd.losses import FGDDistiller

from .common.demo import CHANNELS, dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"FGD": L(FGDDistiller)(channels=[(CHANNELS, CHANNELS)] * 4, temperature=0.5, alpha=1e-3,
                            beta=5e-4, gamma=5e-4, lambda_=5e-6)},
    "Demo/FasterRCNN-R18-teacher.yaml",
    "output/demo/teacher/model_final.pth",
)
train.output_dir = "output/demo/student_fgd_lazy"
