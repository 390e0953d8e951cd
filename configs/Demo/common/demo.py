"""LazyConfig pieces shared by the demo's .py configs (the twins of the demo's .yaml files): the
RetinaNet-R18 student trained from scratch (GN everywhere), the pkd_demo data, the solver, and
``distill(...)`` that wraps the student with a teacher and losses."""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import ResNet
from detectron2.solver import WarmupParamScheduler

from pkd.data import DEMO_CLASSES, DEMO_TRAIN, DEMO_VAL

from ...common.distill import distill_model

CHANNELS = 64
# The schedule of RetinaNet-R18.yaml (SOLVER.MAX_ITER, STEPS, WARMUP_ITERS of Base-Demo.yaml)
MAX_ITER, STEPS, WARMUP_ITERS = 100, (75, 92), 30

# Student: Detectron2's RetinaNet LazyConfig, shrunk to ResNet-18 + GN (RetinaNet-R18.yaml).
student = model_zoo.get_config("common/models/retinanet.py").model
student.backbone.bottom_up.stem.norm = "GN"
student.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="GN")
student.backbone.bottom_up.freeze_at = 0
student.backbone.out_channels = CHANNELS
student.backbone.norm = "GN"
student.backbone.top_block.in_channels = 512
student.head.input_shape = [ShapeSpec(channels=CHANNELS)] * 5
student.head.conv_dims = [CHANNELS, CHANNELS]
student.head.norm = "GN"
student.anchor_generator.sizes = [  # objects are 16-64 px
    [16, 20, 25], [32, 40, 51], [64, 81, 102], [128, 161, 203], [256, 323, 406]
]
student.num_classes = len(DEMO_CLASSES)
student.pixel_std = [57.375, 57.120, 58.395]


def distill(losses, teacher_config, teacher_weights, num_levels=4, inherit=False, head=False):
    """A DistillMetaArch config around ``student``, distilled from ``teacher_config`` (a yacs/.py
    file named relative to configs/, as every shipped config names its teacher, e.g.
    "Demo/FasterRCNN-R18-teacher.yaml") with checkpoint ``teacher_weights``; the other arguments:
    see ``configs/common/distill.py``."""
    return distill_model(
        student,
        teacher_config,
        teacher_weights,
        losses,
        num_levels=num_levels,
        inherit=inherit,
        head=head,
    )


dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = DEMO_TRAIN
dataloader.train.mapper.use_instance_mask = False
dataloader.train.mapper.augmentations[0].short_edge_length = (112, 128)
dataloader.train.mapper.augmentations[0].max_size = 192
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = DEMO_VAL
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 192
dataloader.test.num_workers = 1
# predictions and COCO results next to the checkpoints, as the yacs trainer writes them
dataloader.evaluator.output_dir = "${...train.output_dir}/inference/" + DEMO_VAL

optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.lr = 0.02

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.max_iter = MAX_ITER
train.eval_period = 0  # evaluate once, at the end
train.checkpointer.period = 100000


def lr_schedule(max_iter=MAX_ITER, steps=STEPS, warmup_iters=WARMUP_ITERS):
    """As the yacs configs: x0.1 at each of ``steps``, linear warm-up over ``warmup_iters``. The
    scheduler sees training progress (iteration / train.max_iter), so overriding train.max_iter
    scales the whole schedule."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01], milestones=list(steps), num_updates=max_iter
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_factor=0.001,
    )


lr_multiplier = lr_schedule()
