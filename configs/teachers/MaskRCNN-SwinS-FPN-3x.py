"""LazyConfig twin of MaskRCNN-SwinS-FPN-3x.yaml: the PKD Swin rows' teacher, Mask R-CNN with a
Swin-S + FPN backbone (box AP 48.2, MMDetection's mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco),
as Detectron2's ViTDet project builds Swin detectors: Detectron2's own SwinTransformer under FPN.

Weights: MMDetection's mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth
converted as the .yaml twin says (``--config`` may name this file instead) into
output/teachers/mask_rcnn_swin_s_3x.pth, the path the distillation configs name. Only ``model`` is
defined: this config describes the teacher, it is not a training recipe.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN, SwinTransformer
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(FPN)(
    bottom_up=L(SwinTransformer)(
        embed_dim=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        drop_path_rate=0.2,  # MMDetection's Swin-S detection configs (inactive in a frozen teacher)
        out_indices=(0, 1, 2, 3),
    ),
    # Detectron2's Swin names stage i "p<i>" (strides 4..32); the FPN outputs p2..p6.
    in_features=["p0", "p1", "p2", "p3"],
    out_channels=256,
    top_block=L(LastLevelMaxPool)(),
)
# MMDetection's Swin models read RGB normalised with ImageNet mean/std; DistillMetaArch re-orders
# and re-normalises the BGR student's images for the teacher.
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
