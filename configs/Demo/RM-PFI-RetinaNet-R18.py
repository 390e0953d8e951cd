"""LazyConfig twin of RM-PFI-RetinaNet-R18.yaml: Rank Mimicking + Prediction-guided Feature
Imitation from the RetinaNet-R34 teacher (same anchors per location as the student)."""
from detectron2.config import LazyCall as L

from pkd.losses import PFILoss, RankMimicLoss

from .common.demo import dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"RM": L(RankMimicLoss)(weight=4.0, temperature=1.0), "PFI": L(PFILoss)(weight=1.5)},
    "Demo/RetinaNet-R18-teacher.yaml",
    "output/demo/retina_teacher/model_final.pth",
    head=True,
)
train.output_dir = "output/demo/student_rm-pfi_lazy"
