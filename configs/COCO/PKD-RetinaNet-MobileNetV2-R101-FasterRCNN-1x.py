"""PKD: RetinaNet MobileNetV2 student <- Faster R-CNN R101-FPN teacher, 1x.
LazyConfig twin of PKD-RetinaNet-MobileNetV2-R101-FasterRCNN-1x.yaml: the student is Detectron2's
RetinaNet LazyConfig with torchvision's ImageNet MobileNetV2 as the bottom-up network of its FPN
(P6/P7 from P5), reading RGB with ImageNet statistics; the teacher is the same yacs config.

  tools/train_net.py --config-file configs/COCO/PKD-RetinaNet-MobileNetV2-R101-FasterRCNN-1x.py \
      --num-gpus 8
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from pkd.losses import PKDLoss
from pkd.modeling.torchvision_backbone import (
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
    TorchvisionBackbone,
)

from .common.recipe import dataloader, distill, lr_schedule, optimizer, train, zoo_student

student = zoo_student("RetinaNet")
student.backbone.bottom_up = L(TorchvisionBackbone)(
    name="mobilenet_v2",
    # torchvision's mobilenet_v2-b0353104.pth; tools/setup_env.sh installs it for offline use.
    weights="MobileNet_V2_Weights.IMAGENET1K_V1",
    out_features=["res3", "res4", "res5"],
    norm="FrozenBN",
    freeze_at=2,
)
student.backbone.top_block = L(LastLevelP6P7)(
    in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
)
student.pixel_mean = list(IMAGENET_PIXEL_MEAN)
student.pixel_std = list(IMAGENET_PIXEL_STD)
student.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"

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
