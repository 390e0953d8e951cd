"""LazyConfig piece: a torchvision classification network under the FPN of a Detectron2
RetinaNet/FCOS LazyConfig student (the LazyConfig side of ``MODEL.TORCHVISION.*`` with
``build_retinanet_torchvision_fpn_backbone``)."""
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from pkd.modeling.torchvision_backbone import (
    IMAGENET_PIXEL_MEAN,
    IMAGENET_PIXEL_STD,
    TorchvisionBackbone,
)


def torchvision_dense_student(student, dataloader, name, weights, freeze_at=2, norm="FrozenBN"):
    """Puts ``torchvision.models.<name>`` (initialised from ``weights``: a weights enum name or a
    state-dict file) under ``student``'s FPN — res3..res5 -> p3..p5, P6/P7 from P5 — and makes
    the student and ``dataloader`` read what ImageNet weights expect: RGB, ImageNet mean/std.
    Returns ``student``."""
    levels = ["res3", "res4", "res5"]
    student.backbone.bottom_up = L(TorchvisionBackbone)(
        name=name, weights=weights, out_features=levels, norm=norm, freeze_at=freeze_at
    )
    student.backbone.in_features = levels
    student.backbone.top_block = L(LastLevelP6P7)(
        in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
    )
    student.pixel_mean = list(IMAGENET_PIXEL_MEAN)
    student.pixel_std = list(IMAGENET_PIXEL_STD)
    student.input_format = "RGB"
    # Detectron2's data LazyConfig: the test mapper's image_format follows the training one's
    dataloader.train.mapper.image_format = "RGB"
    return student
