"""PKD: RetinaNet MobileNetV2 student <- Faster R-CNN R101-FPN teacher, 1x.
LazyConfig twin of PKD-RetinaNet-MobileNetV2-R101-FasterRCNN-1x.yaml: the student is Detectron2's
RetinaNet LazyConfig with torchvision's ImageNet MobileNetV2 as the bottom-up network of its FPN
(P6/P7 from P5), reading RGB with ImageNet statistics; the teacher is the same yacs config.

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-MobileNetV2-R101-FasterRCNN-1x.py \
      --num-gpus 8
"""
from detectron2.config import LazyCall as L

from pkd.losses import PKDLoss

from ..common.torchvision import torchvision_dense_student
from .common.recipe import dataloader, distill, lr_schedule, optimizer, train, zoo_student

# torchvision's mobilenet_v2-b0353104.pth; tools/setup_env.sh installs it for offline use.
student = torchvision_dense_student(
    zoo_student("RetinaNet"), dataloader, "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1"
)

model = distill(
    student,
    "FasterRCNN-R101-FPN-2x.yaml",
    {"PKD": L(PKDLoss)(weight=6.0, resize_student=True)},
    num_levels=4,
)

optimizer.lr = 0.01
lr_multiplier = lr_schedule(1)
train.max_iter = 90000
# The ImageNet init comes with the backbone (weights= above), not from a checkpoint.
train.init_checkpoint = ""
train.output_dir = "output/coco/pkd_retinanet_mobilenet_v2_r101_faster_rcnn_1x_lazy"
