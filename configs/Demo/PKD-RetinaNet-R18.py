"""LazyConfig twin of PKD-RetinaNet-R18.yaml: the CPU demo's RetinaNet-R18 student distilled with
PKD from the Faster R-CNN R18 teacher (a yacs teacher config is fine in a LazyConfig).

  tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-R18.py train.max_iter=100
"""
import os
from collections import OrderedDict

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import ResNet
from detectron2.solver import WarmupParamScheduler

from pkd.data import DEMO_TRAIN, DEMO_VAL, DEMO_CLASSES
from pkd.losses import PKDLoss
from pkd.meta_arch import DistillMetaArch
from pkd.teacher import load_teacher

_here = os.path.dirname(__file__)
_channels = 64

# Student: Detectron2's RetinaNet LazyConfig, shrunk to ResNet-18 + GN (trained from scratch).
student = model_zoo.get_config("common/models/retinanet.py").model
student.backbone.bottom_up.stem.norm = "GN"
student.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="GN")
student.backbone.bottom_up.freeze_at = 0
student.backbone.out_channels = _channels
student.backbone.norm = "GN"
student.backbone.top_block.in_channels = 512
student.head.input_shape = [ShapeSpec(channels=_channels)] * 5
student.head.conv_dims = [_channels, _channels]
student.head.norm = "GN"
student.anchor_generator.sizes = [  # as in RetinaNet-R18.yaml: objects are 16-64 px
    [16, 20, 25], [32, 40, 51], [64, 81, 102], [128, 161, 203], [256, 323, 406]
]
student.num_classes = len(DEMO_CLASSES)
student.pixel_std = [57.375, 57.120, 58.395]

model = L(DistillMetaArch)(
    student=student,
    teacher=L(load_teacher)(
        config=os.path.join(_here, "FasterRCNN-R18-teacher.yaml"),
        weights="output/demo/teacher/model_final.pth",
        device="${...train.device}",
    ),
    # instantiate() does not descend into plain dicts: build the mapping with L(OrderedDict)
    losses=L(OrderedDict)(PKD=L(PKDLoss)(weight=6.0, resize_student=True)),
    num_levels=4,  # student p3..p6 <-> teacher p2..p5
    student_input_format="${..dataloader.train.mapper.image_format}",
)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = DEMO_TRAIN
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations[0].short_edge_length = (128, 144, 160)
dataloader.train.mapper.augmentations[0].max_size = 256
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = DEMO_VAL
dataloader.test.mapper.augmentations[0].short_edge_length = 144
dataloader.test.mapper.augmentations[0].max_size = 256
dataloader.test.num_workers = 1

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.output_dir = "output/demo/student_pkd_lazy"
train.max_iter = 150
train.eval_period = 0  # evaluate once, at the end
train.checkpointer.period = 100000

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[110, 140], num_updates="${train.max_iter}"
    ),
    warmup_length=50 / 150,  # a fraction of train.max_iter
    warmup_factor=0.001,
)
