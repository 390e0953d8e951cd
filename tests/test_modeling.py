"""The yacs-buildable models: FCOS (pkd.modeling.fcos) is Detectron2's LazyConfig FCOS, and the Swin
+ FPN backbone (pkd.modeling.swin) is the paper's Mask R-CNN Swin-S teacher trunk."""
import os

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import ImageList

import pkd.modeling.swin  # noqa: F401  (registers build_swin_fpn_backbone)
from pkd.config import get_distill_cfg
from pkd.meta_arch import student_config
from pkd.modeling.swin import add_swin_config

from pkd_testing import CONFIGS, make_batch

SWIN_TEACHER = os.path.join(CONFIGS, "teachers", "MaskRCNN-SwinS-FPN-3x")
TINY_SWIN = {"EMBED_DIM": 32, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 2, 4, 8]}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def fcos_pair():
    """The COCO FCOS student from yacs and Detectron2's LazyConfig FCOS, same weights."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "COCO", "PGD-FCOS-R50-R101-FCOS3x-1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    yacs = build_model(student_config(cfg))
    lazy_cfg = model_zoo.get_config("common/models/fcos.py").model
    lazy_cfg.num_classes = cfg.MODEL.FCOS.NUM_CLASSES
    lazy = instantiate(lazy_cfg)
    return yacs, lazy


def test_yacs_fcos_has_the_lazyconfig_fcos_parameters(fcos_pair):
    yacs, lazy = fcos_pair
    assert type(lazy).__name__ == "FCOS" and isinstance(yacs, type(lazy))
    assert _shapes(yacs) == _shapes(lazy)  # names and shapes of parameters and buffers
    assert yacs.backbone.output_shape() == lazy.backbone.output_shape()
    assert yacs.head_in_features == lazy.head_in_features == ["p3", "p4", "p5", "p6", "p7"]


def test_yacs_fcos_computes_what_the_lazyconfig_fcos_computes(fcos_pair):
    yacs, lazy = fcos_pair
    lazy.load_state_dict(yacs.state_dict())
    yacs.eval()
    lazy.eval()
    batch = make_batch()
    with torch.no_grad():
        images = ImageList.from_tensors(
            [(x["image"] - yacs.pixel_mean) / yacs.pixel_std for x in batch],
            yacs.backbone.size_divisibility,
        ).tensor
        features = [yacs.backbone(images), lazy.backbone(images)]
        outputs = [
            m.head([f[k] for k in m.head_in_features]) for m, f in zip((yacs, lazy), features)
        ]
    for level in features[0]:
        torch.testing.assert_close(features[0][level], features[1][level])
    for a, b in zip(*outputs):  # logits, box deltas, centerness: per level
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
    assert [yacs.test_score_thresh, yacs.test_nms_thresh, yacs.max_detections_per_image] == [
        lazy.test_score_thresh, lazy.test_nms_thresh, lazy.max_detections_per_image
    ]


def _swin_cfg(**swin):
    cfg = get_distill_cfg()
    add_swin_config(cfg)
    cfg.merge_from_file(SWIN_TEACHER + ".yaml")
    for key, value in swin.items():
        cfg.MODEL.SWIN[key] = value
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_swin_fpn_backbone_levels_and_shapes():
    backbone = build_backbone(_swin_cfg(**TINY_SWIN))
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        f"p{i}": (256, 2**i) for i in range(2, 7)
    }
    assert backbone.size_divisibility == 32
    features = backbone(torch.randn(2, 3, 128, 192))
    for name, f in features.items():
        assert f.shape == (2, 256, 128 // shapes[name].stride, 192 // shapes[name].stride)
    # Swin stages p0..p3 (C = 32, 64, 128, 256) feed the FPN laterals.
    stages = backbone.bottom_up.output_shape()
    assert [stages[f"p{i}"].channels for i in range(4)] == [32, 64, 128, 256]


def test_swin_s_teacher_architecture():
    """The teacher config is Swin-S: embed 96, depths 2-2-18-2, heads 3-6-12-24, window 7."""
    swin = build_backbone(_swin_cfg()).bottom_up
    assert swin.embed_dim == 96
    assert [len(layer.blocks) for layer in swin.layers] == [2, 2, 18, 2]
    assert [layer.blocks[0].attn.num_heads for layer in swin.layers] == [3, 6, 12, 24]
    assert {b.window_size for layer in swin.layers for b in layer.blocks} == {7}
    assert type(swin.layers[3].blocks[1].drop_path).__name__ == "DropPath"  # timm, rate 0.2


def test_swin_teacher_yacs_and_lazyconfig_are_the_same_model():
    cfg = _swin_cfg(**TINY_SWIN)
    yacs = build_model(cfg)
    lazy_cfg = LazyConfig.load(SWIN_TEACHER + ".py")
    lazy_cfg = LazyConfig.apply_overrides(
        lazy_cfg,
        [f"model.backbone.bottom_up.{k.lower()}={v}" for k, v in TINY_SWIN.items()],
    )
    lazy = instantiate(lazy_cfg.model)
    assert _shapes(yacs) == _shapes(lazy)
    assert yacs.input_format == lazy.input_format == "RGB"
    torch.testing.assert_close(yacs.pixel_mean, lazy.pixel_mean)
    torch.testing.assert_close(yacs.pixel_std, lazy.pixel_std)


def test_swin_out_features_are_checked():
    cfg = _swin_cfg(**TINY_SWIN)
    cfg.MODEL.SWIN.OUT_FEATURES = ["p1", "p4"]
    with pytest.raises(ValueError, match=r"OUT_FEATURES \['p4'\]"):
        build_backbone(cfg)
