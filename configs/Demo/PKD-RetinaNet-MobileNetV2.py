"""LazyConfig twin of PKD-RetinaNet-MobileNetV2.yaml (what ``make demo`` trains): the demo's
RetinaNet student on torchvision's ImageNet MobileNetV2 (RGB, ImageNet statistics, stem and res2
frozen), distilled with PKD from the Faster R-CNN-MobileNetV2 teacher (a yacs teacher config is
fine in a LazyConfig); student p3..p6 <-> teacher p2..p5, 300 iterations.

  tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-MobileNetV2.py \
      model.teacher.weights=output/demo/teacher/model_final.pth
"""
from detectron2.config import LazyCall as L

from pkd.data import DEMO_TEST
from pkd.losses import PKDLoss

from ..common.torchvision import torchvision_dense_student
from .common.demo import dataloader, distill, lr_schedule, optimizer, student, train

# torchvision's mobilenet_v2-b0353104.pth; tools/setup_env.sh installs it for offline use.
torchvision_dense_student(student, dataloader, "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1")
dataloader.test.dataset.names = DEMO_TEST
dataloader.evaluator.output_dir = "${...train.output_dir}/inference/" + DEMO_TEST

model = distill(
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    "Demo/FasterRCNN-MobileNetV2-teacher.yaml",
    "output/demo/teacher/model_final.pth",
)
lr_multiplier = lr_schedule(max_iter=300, steps=(225, 280))
train.max_iter = 300
train.output_dir = "output/demo/student_pkd_lazy"
