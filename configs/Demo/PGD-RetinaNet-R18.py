"""LazyConfig twin of PGD-RetinaNet-R18.yaml: PGD from the RetinaNet-R34 teacher (a dense teacher
is required), ATSS-style values for this anchor-based student, FPN and head inherited."""
from detectron2.config import LazyCall as L

from pkd.losses import PGDLoss

from .common.demo import dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"PGD": L(PGDLoss)(topk=9, alpha=0.08, beta=0.04, gamma=0.128)},
    "Demo/RetinaNet-R18-teacher.yaml",
    "output/demo/retina_teacher/model_final.pth",
    inherit=True,
    head=True,
)
train.output_dir = "output/demo/student_pgd_lazy"
