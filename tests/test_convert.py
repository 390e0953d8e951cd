"""pkd.convert / tools/convert_teacher.py: MMDetection teacher checkpoints -> Detectron2.

The source state dicts are laid out exactly as MMDetection lays them out (names and shapes from
mmdet/models/backbones/{swin,resnet,resnext}.py, layers/transformer/utils.py (PatchEmbed,
PatchMerging), necks/fpn.py, dense_heads/{retina,fcos,rpn}_head.py, roi_heads, and mmcv's
ConvModule / FFN / Scale), with tiny sizes and random values. The targets are real Detectron2
modules built directly, so these tests do not depend on any teacher config of the project.
"""
import argparse
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.backbone.swin import PatchMerging, SwinTransformer
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from pkd.checkpoint import UNSAFE_LOAD_ENV, CheckpointLoadError
from pkd.convert import (
    AUTHOR,
    ConversionError,
    check_against_model,
    convert_mmdet_state_dict,
    convert_teacher,
    load_mmdet_checkpoint,
)
from pkd.teacher import load_teacher, load_teacher_weights
from pkd_testing import DEMO, REPO

SWIN = dict(embed=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=7)
FPN_CHANNELS = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- MMDetection layouts (test-only)
def _conv(sd, name, cout, cin, k, bias=True):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k) * 0.1
    if bias:
        sd[f"{name}.bias"] = torch.randn(cout) * 0.1


def _linear(sd, name, cin, cout, bias=True):
    sd[f"{name}.weight"] = torch.randn(cout, cin) * 0.1
    if bias:
        sd[f"{name}.bias"] = torch.randn(cout) * 0.1


def _norm(sd, name, c, kind="ln"):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c)
    if kind == "bn":  # BatchNorm buffers, in state_dict order
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def mmdet_relative_position_index(window):
    """WindowMSA.__init__ (mmdet/models/backbones/swin.py): double_step_seq, then flip(1)."""
    seq1 = torch.arange(0, (2 * window - 1) * window, 2 * window - 1)
    coords = (seq1[:, None] + torch.arange(window)[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def mmdet_swin(embed, depths, heads, window, out_indices=(0, 1, 2, 3)):
    sd = {}
    _conv(sd, "backbone.patch_embed.projection", embed, 3, 4)
    _norm(sd, "backbone.patch_embed.norm", embed)
    for i, (depth, num_heads) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        for j in range(depth):
            b = f"backbone.stages.{i}.blocks.{j}."
            _norm(sd, b + "norm1", c)
            sd[b + "attn.w_msa.relative_position_bias_table"] = torch.randn(
                (2 * window - 1) ** 2, num_heads
            )
            sd[b + "attn.w_msa.relative_position_index"] = mmdet_relative_position_index(window)
            _linear(sd, b + "attn.w_msa.qkv", c, 3 * c)
            _linear(sd, b + "attn.w_msa.proj", c, c)
            _norm(sd, b + "norm2", c)
            _linear(sd, b + "ffn.layers.0.0", c, 4 * c)  # mmcv FFN: Sequential(Linear, act, drop)
            _linear(sd, b + "ffn.layers.1", 4 * c, c)
        if i < len(depths) - 1:  # PatchMerging(in=c, out=2c): norm over the 4c unfolded dims
            _norm(sd, f"backbone.stages.{i}.downsample.norm", 4 * c)
            _linear(sd, f"backbone.stages.{i}.downsample.reduction", 4 * c, 2 * c, bias=False)
    for i in out_indices:
        _norm(sd, f"backbone.norm{i}", embed * 2**i)
    return sd


def mmdet_resnet(blocks, widths, *, stem, bottleneck=None, groups=1, norm="bn", dcn_layers=()):
    """ResNet/ResNeXt (pytorch style); ``bottleneck`` = per-stage conv2 widths, else BasicBlock."""
    sd = {}
    _conv(sd, "backbone.conv1", stem, 3, 7, bias=False)
    _norm(sd, f"backbone.{norm}1", stem, norm)
    cin = stem
    for k, (n, cout) in enumerate(zip(blocks, widths), start=1):
        for j in range(n):
            b = f"backbone.layer{k}.{j}."
            if bottleneck:
                w = bottleneck[k - 1]
                convs = [(w, cin, 1), (w, w // groups, 3), (cout, w, 1)]
            else:
                convs = [(cout, cin, 3), (cout, cout, 3)]
            for i, (o, c, kernel) in enumerate(convs, start=1):
                _conv(sd, f"{b}conv{i}", o, c, kernel, bias=False)
                _norm(sd, f"{b}{norm}{i}", o, norm)
                if i == 2 and k in dcn_layers:  # mmcv DeformConv2dPack: offsets for 3x3 taps
                    _conv(sd, f"{b}conv2.conv_offset", 18, c * groups, 3)
            if j == 0 and (cin != cout or k > 1):
                _conv(sd, f"{b}downsample.0", cout, cin, 1, bias=False)
                _norm(sd, f"{b}downsample.1", cout, norm)
            cin = cout
    return sd


def mmdet_fpn(in_channels, *, start_level=0, extra=None, num_outs=5, out=FPN_CHANNELS):
    """mmdet FPN: ConvModule laterals/outputs, then ``add_extra_convs`` convs in fpn_convs."""
    sd = {}
    used = in_channels[start_level:]
    for i, c in enumerate(used):
        _conv(sd, f"neck.lateral_convs.{i}.conv", out, c, 1)
    for i in range(len(used)):
        _conv(sd, f"neck.fpn_convs.{i}.conv", out, out, 3)
    for e in range(num_outs - len(used) if extra else 0):
        cin = in_channels[-1] if e == 0 and extra == "on_input" else out
        _conv(sd, f"neck.fpn_convs.{len(used) + e}.conv", out, cin, 3)
    return sd


def _towers(sd, num_convs, norm, c):
    for tower in ("cls", "reg"):
        for i in range(num_convs):  # ConvModule bias='auto': no bias next to a norm
            _conv(sd, f"bbox_head.{tower}_convs.{i}.conv", c, c, 3, bias=not norm)
            if norm:
                _norm(sd, f"bbox_head.{tower}_convs.{i}.gn", c, "gn")


def mmdet_retina_head(num_classes, *, num_convs=2, anchors=9, norm=False, c=FPN_CHANNELS):
    sd = {}
    _towers(sd, num_convs, norm, c)
    _conv(sd, "bbox_head.retina_cls", anchors * num_classes, c, 3)
    _conv(sd, "bbox_head.retina_reg", anchors * 4, c, 3)
    return sd


def mmdet_fcos_head(num_classes, *, num_convs=2, levels=5, c=FPN_CHANNELS):
    """AnchorFreeHead/FCOSHead with GN towers (norm_cfg=GN, conv_bias='auto')."""
    sd = {}
    _towers(sd, num_convs, True, c)
    _conv(sd, "bbox_head.conv_cls", num_classes, c, 3)
    _conv(sd, "bbox_head.conv_reg", 4, c, 3)
    _conv(sd, "bbox_head.conv_centerness", 1, c, 3)
    for i in range(levels):  # mmcv Scale: a 0-d parameter per level
        sd[f"bbox_head.scales.{i}.scale"] = torch.tensor(1.0 + 0.1 * i)
    return sd


def mmdet_rcnn_heads(num_classes=5):
    """A Mask R-CNN's RPNHead and StandardRoIHead (shared 2fc box head, FCN mask head)."""
    sd = {}
    _conv(sd, "rpn_head.rpn_conv", FPN_CHANNELS, FPN_CHANNELS, 3)
    _conv(sd, "rpn_head.rpn_cls", 3, FPN_CHANNELS, 1)
    _conv(sd, "rpn_head.rpn_reg", 12, FPN_CHANNELS, 1)
    _linear(sd, "roi_head.bbox_head.shared_fcs.0", FPN_CHANNELS * 49, 64)
    _linear(sd, "roi_head.bbox_head.shared_fcs.1", 64, 64)
    _linear(sd, "roi_head.bbox_head.fc_cls", 64, num_classes + 1)
    _linear(sd, "roi_head.bbox_head.fc_reg", 64, 4 * num_classes)
    _conv(sd, "roi_head.mask_head.convs.0.conv", FPN_CHANNELS, FPN_CHANNELS, 3)
    sd["roi_head.mask_head.upsample.weight"] = torch.randn(FPN_CHANNELS, FPN_CHANNELS, 2, 2)
    sd["roi_head.mask_head.upsample.bias"] = torch.randn(FPN_CHANNELS)
    _conv(sd, "roi_head.mask_head.conv_logits", num_classes, FPN_CHANNELS, 1)
    return sd


def save_mmdet(path, state_dict, **meta):
    meta = {"epoch": 12, "CLASSES": ("a", "b"), **meta}
    torch.save({"state_dict": state_dict, "meta": meta}, path)
    return str(path)


# ---------------------------------------------------------------- Detectron2 targets
def d2_swin_fpn(embed, depths, heads, window):
    swin = SwinTransformer(
        embed_dim=embed, depths=depths, num_heads=heads, window_size=window, drop_path_rate=0.0
    )
    fpn = FPN(
        bottom_up=swin,
        in_features=["p0", "p1", "p2", "p3"],
        out_channels=FPN_CHANNELS,
        top_block=LastLevelMaxPool(),
    )
    return nn.ModuleDict({"backbone": fpn})


def d2_resnet(blocks, widths, *, stem, bottleneck=None, groups=1, norm="FrozenBN"):
    stages, cin = [], stem
    for k, (n, cout) in enumerate(zip(blocks, widths)):
        kwargs = dict(norm=norm, stride_per_block=[1 if k == 0 else 2] + [1] * (n - 1))
        if bottleneck:
            kwargs.update(bottleneck_channels=bottleneck[k], num_groups=groups, stride_in_1x1=False)
        block = BottleneckBlock if bottleneck else BasicBlock
        stages.append(ResNet.make_stage(block, n, in_channels=cin, out_channels=cout, **kwargs))
        cin = cout
    return ResNet(BasicStem(3, stem, norm=norm), stages, out_features=["res3", "res4", "res5"])


def d2_dense(bottom_up, head_cls, top_in_feature, **head_kwargs):
    """Backbone (FPN p3..p7) + dense head, named like Detectron2's RetinaNet/FCOS."""
    in_p6 = bottom_up.output_shape()["res5"].channels if top_in_feature == "res5" else FPN_CHANNELS
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=["res3", "res4", "res5"],
        out_channels=FPN_CHANNELS,
        top_block=LastLevelP6P7(in_p6, FPN_CHANNELS, in_feature=top_in_feature),
    )
    head = head_cls(
        input_shape=[ShapeSpec(channels=FPN_CHANNELS)] * 5,
        conv_dims=[FPN_CHANNELS] * 2,
        **head_kwargs,
    )
    return nn.ModuleDict({"backbone": fpn, "head": head})


RESNEXT = dict(
    blocks=(1, 2, 1, 1), widths=(32, 64, 128, 256), stem=16, bottleneck=(16, 32, 64, 128), groups=4
)


def retinanet_source():
    sd = mmdet_resnet(**RESNEXT)
    sd.update(mmdet_fpn([32, 64, 128, 256], start_level=1, extra="on_input"))
    sd.update(mmdet_retina_head(num_classes=5))
    return sd


# ---------------------------------------------------------------- tests
def test_swin_mask_rcnn_backbone_and_fpn(tmp_path):
    source = mmdet_swin(**SWIN)
    source.update(mmdet_fpn([32, 64, 128, 256]))
    source.update(mmdet_rcnn_heads())
    src = save_mmdet(tmp_path / "mask_rcnn_swin.pth", source, config="model = dict(...)")
    out = str(tmp_path / "teacher.pth")

    report = convert_teacher(src, out)

    saved = torch.load(out, weights_only=True)
    assert saved["__author__"] == AUTHOR and saved["matching_heuristics"] is False
    with open(src, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    assert saved["source"] == {"path": os.path.abspath(src), "sha256": sha256, "format": "mmdet"}
    # Every source tensor is converted or deliberately skipped (the R-CNN heads), none twice.
    rcnn = {k for k in source if k.startswith(("rpn_head.", "roi_head."))}
    assert set(report.skipped) == rcnn
    assert sorted(report.converted.values()) == sorted(set(source) - rcnn)
    assert "roi_head.mask_head.conv_logits.weight" in report.summary()

    model = d2_swin_fpn(**SWIN)
    check_against_model(saved["model"], model)
    load_teacher_weights(model, out)  # the path FrozenTeacher takes, strict on the backbone
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved["model"].items())
    assert torch.equal(
        loaded["backbone.fpn_lateral2.weight"], source["neck.lateral_convs.0.conv.weight"]
    )
    assert torch.equal(
        loaded["backbone.bottom_up.layers.1.blocks.1.attn.qkv.weight"],
        source["backbone.stages.1.blocks.1.attn.w_msa.qkv.weight"],
    )


def mmdet_unfold_order(x):
    """MMDetection's swin_converter (original Swin -> MMDetection):
    correct_unfold_reduction_order / correct_unfold_norm_order."""
    if x.dim() == 2:
        out_channel, in_channel = x.shape
        x = x.reshape(out_channel, 4, in_channel // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)
    return x.reshape(4, -1)[[0, 2, 1, 3], :].transpose(0, 1).reshape(-1)


def d2_to_mmdet_swin_fpn(state):
    """Test-only reverse mapping: a Detectron2 Swin+FPN state dict in MMDetection's layout."""
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", key):
            convs = "lateral_convs" if m[1] == "lateral" else "fpn_convs"
            out[f"neck.{convs}.{int(m[2]) - 2}.conv.{m[3]}"] = value
            continue
        for d2, mmdet in [
            ("backbone.bottom_up.", "backbone."),
            ("backbone.layers.", "backbone.stages."),
            ("patch_embed.proj.", "patch_embed.projection."),
            (".attn.", ".attn.w_msa."),
            (".mlp.fc1.", ".ffn.layers.0.0."),
            (".mlp.fc2.", ".ffn.layers.1."),
        ]:
            key = key.replace(d2, mmdet)
        out[key] = mmdet_unfold_order(value) if ".downsample." in key else value
    return out


def test_swin_round_trip_reproduces_fpn_outputs():
    """Detectron2 -> MMDetection (with MMDetection's own permutation) -> pkd.convert -> Detectron2
    gives the same model, hence the same FPN maps."""
    original = d2_swin_fpn(**SWIN).eval()
    for p in original.parameters():  # LayerNorms start at 1/0: randomise them too
        p.data.normal_(0, 0.2)
    weights, _ = convert_mmdet_state_dict(d2_to_mmdet_swin_fpn(original.state_dict()))
    converted = d2_swin_fpn(**SWIN).eval()
    converted.load_state_dict(weights, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, actual = original.backbone(x), converted.backbone(x)
    assert list(actual) == ["p2", "p3", "p4", "p5", "p6"]
    for level in expected:
        assert torch.equal(actual[level], expected[level]), level


def mmdet_patch_merging(x, hw, norm_weight, norm_bias, reduction):
    """MMDetection's PatchMerging.forward (kernel = stride = 2, 'corner' adaptive padding)."""
    (h, w), c = hw, x.shape[-1]
    x = x.view(x.shape[0], h, w, c).permute(0, 3, 1, 2)
    x = F.pad(x, [0, w % 2, 0, h % 2])
    x = F.unfold(x, kernel_size=2, stride=2).transpose(1, 2)
    x = F.layer_norm(x, (4 * c,), norm_weight, norm_bias)
    return x @ reduction.T


@pytest.mark.parametrize("hw", [(6, 8), (7, 5)])
def test_patch_merging_matches_mmdet_unfold(hw):
    source = mmdet_swin(**SWIN)
    source.update(mmdet_fpn([32, 64, 128, 256]))
    weights, _ = convert_mmdet_state_dict(source)
    src = {k.split("downsample.")[1]: v for k, v in source.items() if "stages.0.downsample" in k}
    merging = PatchMerging(dim=32)
    merging.load_state_dict(
        {k.split("downsample.")[1]: v for k, v in weights.items() if "layers.0.downsample" in k}
    )
    x = torch.randn(2, hw[0] * hw[1], 32)
    expected = mmdet_patch_merging(
        x, hw, src["norm.weight"], src["norm.bias"], src["reduction.weight"]
    )
    with torch.no_grad():
        torch.testing.assert_close(merging(x, *hw), expected, rtol=1e-5, atol=1e-5)
        # The permutation matters: the unpermuted weights give something else.
        merging.load_state_dict(src)
        assert not torch.allclose(merging(x, *hw), expected, atol=1e-3)


def test_relative_position_index_is_verified():
    assert torch.equal(
        mmdet_relative_position_index(7),
        SwinTransformer(embed_dim=8, depths=(1,), num_heads=(1,), out_indices=(0,))
        .layers[0].blocks[0].attn.relative_position_index,
    )
    source = mmdet_swin(**SWIN)
    source.update(mmdet_fpn([32, 64, 128, 256]))
    key = "backbone.stages.2.blocks.1.attn.w_msa.relative_position_index"
    source[key] = source[key].T.contiguous()
    with pytest.raises(ConversionError, match="relative_position_index"):
        convert_mmdet_state_dict(source)


def test_resnext_retinanet_with_head(tmp_path):
    source = retinanet_source()
    weights, report = convert_mmdet_state_dict(source, with_head=True)
    model = d2_dense(d2_resnet(**RESNEXT), RetinaNetHead, "res5", num_classes=5, num_anchors=9)
    check_against_model(weights, model, ("backbone", "head"))
    assert set(report.skipped) == {k for k in source if k.endswith("num_batches_tracked")}
    assert sorted(report.converted.values()) == sorted(set(source) - set(report.skipped))
    # FPN from res3 (MMDetection start_level=1); the extra convs are P6 (on res5) and P7.
    for d2, mmdet in [
        ("backbone.fpn_lateral3.weight", "neck.lateral_convs.0.conv.weight"),
        ("backbone.top_block.p6.weight", "neck.fpn_convs.3.conv.weight"),
        ("backbone.top_block.p7.weight", "neck.fpn_convs.4.conv.weight"),
        ("head.bbox_subnet.2.bias", "bbox_head.reg_convs.1.conv.bias"),
    ]:
        assert torch.equal(weights[d2], source[mmdet]), d2
    assert any("P7" in n for n in report.notes)
    # Grouped convs of ResNeXt and FrozenBN buffers.
    assert torch.equal(
        weights["backbone.bottom_up.res3.1.conv2.weight"], source["backbone.layer2.1.conv2.weight"]
    )
    assert torch.equal(
        weights["backbone.bottom_up.res2.0.shortcut.norm.running_var"],
        source["backbone.layer1.0.downsample.1.running_var"],
    )
    path = str(tmp_path / "retina.pth")
    torch.save({"model": weights, "__author__": AUTHOR, "matching_heuristics": False}, path)
    load_teacher_weights(model, path, required_parts=("backbone", "head"))


def test_retinanet_anchor_channels_follow_the_same_boxes():
    """MMDetection's anchor a (ratio-major) and Detectron2's (size-major) with the same box get
    the same output channels."""
    source = retinanet_source()
    weights, _ = convert_mmdet_state_dict(source, with_head=True)
    stride, ratios, scales = 8, torch.tensor([0.5, 1.0, 2.0]), 4 * 2 ** (torch.arange(3) / 3)
    # AnchorGenerator.gen_single_level_base_anchors (scale_major=True, center_offset=0).
    h_ratios = torch.sqrt(ratios)
    ws = (stride * (1 / h_ratios)[:, None] * scales[None, :]).view(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
    mmdet_anchors = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
    d2_generator = DefaultAnchorGenerator(
        sizes=[(stride * scales).tolist()], aspect_ratios=[ratios.tolist()], strides=[stride]
    )
    (d2_anchors,) = list(d2_generator.cell_anchors)
    for name, src, per_anchor in [("cls_score", "retina_cls", 5), ("bbox_pred", "retina_reg", 4)]:
        for leaf in ("weight", "bias"):
            d2 = weights[f"head.{name}.{leaf}"].reshape(9, per_anchor, -1)
            mm = source[f"bbox_head.{src}.{leaf}"].reshape(9, per_anchor, -1)
            for a, box in enumerate(d2_anchors):
                (same,) = torch.nonzero(torch.isclose(mmdet_anchors, box, atol=1e-3).all(dim=1))[0]
                assert torch.equal(d2[a], mm[same])
    assert not torch.equal(weights["head.cls_score.weight"], source["bbox_head.retina_cls.weight"])


def test_fcos_head_scales_gn_and_centerness():
    source = mmdet_resnet((1, 1, 1, 1), (16, 32, 64, 128), stem=16)
    source.update(mmdet_fpn([16, 32, 64, 128], start_level=1, extra="on_output"))
    source.update(mmdet_fcos_head(num_classes=5))
    with pytest.raises(ConversionError, match="--drop-fcos-scales"):
        convert_mmdet_state_dict(source, with_head=True)

    weights, report = convert_mmdet_state_dict(source, with_head=True, drop_fcos_scales=True)
    resnet = d2_resnet((1, 1, 1, 1), (16, 32, 64, 128), stem=16)
    model = d2_dense(resnet, FCOSHead, "p5", num_classes=5, norm="GN")
    check_against_model(weights, model, ("backbone", "head"))
    scales = {k for k in source if ".scales." in k}
    assert scales <= set(report.skipped) and any("1.4" in n for n in report.notes)
    # GN towers: conv (no bias in MMDetection: zeros are synthesized), GN, ReLU per layer.
    towers = ("cls_subnet", "bbox_subnet")
    assert set(report.synthesized) == {f"head.{t}.{i}.bias" for t in towers for i in (0, 3)}
    assert not weights["head.cls_subnet.3.bias"].any()
    for d2, mmdet in [
        ("head.bbox_subnet.4.weight", "bbox_head.reg_convs.1.gn.weight"),
        ("head.ctrness.weight", "bbox_head.conv_centerness.weight"),
        ("backbone.top_block.p6.weight", "neck.fpn_convs.3.conv.weight"),  # on_output: 32 -> 32
    ]:
        assert torch.equal(weights[d2], source[mmdet]), d2


def test_deformable_offsets_by_rule():
    # Detectron2's DeformConv needs the compiled _C, so only the names are checked here.
    source = mmdet_resnet(dcn_layers=(3, 4), **RESNEXT)
    source.update(mmdet_fpn([32, 64, 128, 256], start_level=1, extra="on_input"))
    weights, _ = convert_mmdet_state_dict(source)
    assert torch.equal(
        weights["backbone.bottom_up.res4.0.conv2_offset.weight"],
        source["backbone.layer3.0.conv2.conv_offset.weight"],
    )
    assert weights["backbone.bottom_up.res5.0.conv2_offset.bias"].shape == (18,)


def test_unknown_source_key_raises():
    source = mmdet_swin(**SWIN)
    source.update(mmdet_fpn([32, 64, 128, 256]))
    source["backbone.absolute_pos_embed"] = torch.zeros(1, 3136, 32)
    with pytest.raises(ConversionError, match="absolute_pos_embed"):
        convert_mmdet_state_dict(source)
    source = retinanet_source()
    source["bbox_head.retina_iou.weight"] = torch.zeros(9, 32, 3, 3)
    with pytest.raises(ConversionError, match="retina_iou"):
        convert_mmdet_state_dict(source, with_head=True)


def test_missing_source_tensor_and_shape_mismatch_raise():
    source = mmdet_swin(**SWIN)
    source.update(mmdet_fpn([32, 64, 128, 256]))
    del source["backbone.stages.1.blocks.0.attn.w_msa.qkv.weight"]
    weights, _ = convert_mmdet_state_dict(source)
    model = d2_swin_fpn(**SWIN)
    with pytest.raises(ConversionError, match=r"unfilled.*layers\.1\.blocks\.0\.attn\.qkv\.weight"):
        check_against_model(weights, model)
    wider = d2_swin_fpn(**dict(SWIN, embed=48))
    weights, _ = convert_mmdet_state_dict(mmdet_swin(**SWIN) | mmdet_fpn([32, 64, 128, 256]))
    with pytest.raises(ConversionError, match="shape mismatches"):
        check_against_model(weights, wider)


def test_mismatched_target_and_options_raise():
    source = retinanet_source()
    weights, _ = convert_mmdet_state_dict(source, with_head=True)
    retinanet = d2_dense(d2_resnet(**RESNEXT), RetinaNetHead, "res5", num_classes=5, num_anchors=9)
    backbone_only = nn.ModuleDict({"backbone": retinanet["backbone"]})
    with pytest.raises(ConversionError, match="not in the model"):
        check_against_model(weights, backbone_only)
    with pytest.raises(ConversionError, match="fpn-first-level"):
        convert_mmdet_state_dict(source, fpn_first_level=2)
    with pytest.raises(ConversionError, match="anchors per location"):
        convert_mmdet_state_dict(source, with_head=True, anchor_grid=(2, 3))
    rcnn = mmdet_swin(**SWIN) | mmdet_fpn([32, 64, 128, 256]) | mmdet_rcnn_heads()
    with pytest.raises(ConversionError, match="dense head"):
        convert_mmdet_state_dict(rcnn, with_head=True)


def test_loading_is_safe(tmp_path, monkeypatch):
    state = {"backbone.conv1.weight": torch.zeros(1)}
    src = save_mmdet(tmp_path / "unsafe.pth", state, args=argparse.Namespace(lr=0.01))
    with pytest.raises(CheckpointLoadError, match=UNSAFE_LOAD_ENV):
        load_mmdet_checkpoint(src)
    monkeypatch.setenv(UNSAFE_LOAD_ENV, "1")
    assert load_mmdet_checkpoint(src)[0].keys() == state.keys()
    torch.save({"model": state}, tmp_path / "d2.pth")
    with pytest.raises(ConversionError, match="no 'state_dict'"):
        load_mmdet_checkpoint(str(tmp_path / "d2.pth"))


def test_cli_validates_against_teacher_config(tmp_path):
    """The demo RetinaNet teacher (ResNet-34 with GN, head with GN) from an MMDetection layout,
    checked against the model the yacs config builds, then loaded by pkd.teacher.load_teacher."""
    config = os.path.join(DEMO, "RetinaNet-R18-teacher.yaml")
    opts = ["MODEL.FPN.NORM", ""]  # an MMDetection FPN with norm_cfg would norm P6/P7 as well
    source = mmdet_resnet((3, 4, 6, 3), (64, 128, 256, 512), stem=64, norm="gn")
    source.update(mmdet_fpn([64, 128, 256, 512], start_level=1, extra="on_input", out=64))
    source.update(mmdet_retina_head(num_classes=3, norm=True, c=64))
    src = save_mmdet(tmp_path / "retina_r34.pth", source)
    out = str(tmp_path / "out" / "retina_r34_d2.pth")
    tool = os.path.join(REPO, "tools", "convert_teacher.py")
    cmd = [sys.executable, tool, src, out, "--config", config, "--with-head", "--opts", *opts]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Converted 140 tensors, skipped 0 by choice, synthesized 4." in result.stdout
    assert "Synthesized head.cls_subnet.0.bias" in result.stdout

    teacher = load_teacher(config, out, opts, device="cpu", required_parts=("backbone", "head"))
    state = teacher.model.state_dict()
    assert torch.equal(
        state["backbone.bottom_up.res4.5.conv2.norm.weight"], source["backbone.layer3.5.gn2.weight"]
    )
    assert torch.equal(state["head.cls_subnet.1.bias"], source["bbox_head.cls_convs.0.gn.bias"])

    # The same file does not fit an FCOS teacher: the tool says so and exits with 1.
    cmd[cmd.index("--config") + 1] = os.path.join(DEMO, "FCOS-R18-teacher.yaml")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "does not fit the teacher model" in result.stderr
