"""LazyConfig twin of PKD-RetinaNet-MobileNetV2.yaml (what ``make demo`` trains): the demo's
RetinaNet student on torchvision's ImageNet MobileNetV2 (RGB, ImageNet statistics, stem and res2
frozen), distilled with PKD from the Faster R-CNN-MobileNetV2 teacher (a yacs teacher config is
fine in a LazyConfig); student p3..p6 <-> teacher p2..p5, 300 iterations.

  tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-MobileNetV2.py \
      model.teacher.weights=output/demo/teacher/model_final.pth
"""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from pkd.data import DEMO_TEST
from pkd.losses import PKDLoss
from pkd.modeling.torchvision_backbone import (
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
    TorchvisionBackbone,
)

from .common.demo import CHANNELS, dataloader, distill, lr_schedule, optimizer, student, train

student.backbone.bottom_up = L(TorchvisionBackbone)(
    name="mobilenet_v2",
    # torchvision's mobilenet_v2-b0353104.pth; tools/setup_env.sh installs it for offline use.
    weights="MobileNet_V2_Weights.IMAGENET1K_V1",
    out_features=["res3", "res4", "res5"],
    norm="FrozenBN",
    freeze_at=2,
)
student.backbone.in_features = ["res3", "res4", "res5"]
student.backbone.top_block = L(LastLevelP6P7)(
    in_channels=CHANNELS, out_channels=CHANNELS, in_feature="p5"
)
student.pixel_mean = list(IMAGENET_PIXEL_MEAN)
student.pixel_std = list(IMAGENET_PIXEL_STD)
student.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.test.mapper.image_format = "RGB"
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
