"""LazyConfig twin of MSE-RetinaNet-R18.yaml: plain MSE feature imitation from the Faster R-CNN
R18 teacher (student p3..p6 <-> teacher p2..p5)."""
from detectron2.config import LazyCall as L

from pkd.losses import MSELoss

from .common.demo import CHANNELS, dataloader, distill, lr_multiplier, optimizer, train

model = distill(
    {"MSE": L(MSELoss)(weight=1.0, resize_student=True, channels=[(CHANNELS, CHANNELS)] * 4)},
    "Demo/FasterRCNN-R18-teacher.yaml",
    "output/demo/teacher/model_final.pth",
)
train.output_dir = "output/demo/student_mse_lazy"
