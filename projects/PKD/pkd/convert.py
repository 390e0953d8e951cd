"""Convert the published MMDetection teacher checkpoints into Detectron2 checkpoints.

Every tensor is renamed by a rule (regexes per component: Swin, ResNet/ResNeXt, FPN, dense head).
A source tensor that no rule maps and no skip-rule covers is an error; so is, against a target
model, a target tensor left unfilled, a converted tensor the model lacks, or a shape mismatch.
Three layouts change besides the names:

* Swin patch merging: MMDetection gathers each 2x2 neighbourhood with ``nn.Unfold`` (merged
  channel ``c * 4 + kh * 2 + kw``), Detectron2 (the original Swin) concatenates the sub-grids
  (0,0), (1,0), (0,1), (1,1) (channel ``p * C + c``): ``reduction.weight`` columns and
  ``norm.{weight,bias}`` are reordered (the inverse of MMDetection's ``swin_converter``).
* RetinaNet ``retina_cls``/``retina_reg``: MMDetection orders a location's anchors ratio-major,
  Detectron2 size-major; output channels are regrouped per anchor.
* Head tower convs: MMDetection has no bias next to a norm layer; Detectron2's always has one, so
  zeros are written (exact).

Class order needs no change: MMDetection's COCO classes follow the annotation file's category
order (ascending id), Detectron2's contiguous ids the sorted ids; both are sigmoid, no background.

Not expressible in weights (errors or notes in the :class:`ConversionReport`): MMDetection FCOS's
per-level ``scales``, FCOS heads trained without ``norm_on_bbox``/``centerness_on_reg``, and
MMDetection RetinaNet's P7 computed without the ReLU Detectron2 applies. The teacher config must
match the ResNet style (pytorch: ``RESNETS.STRIDE_IN_1X1 False``), pixel mean/std and format.
DCN offsets (``conv2.conv_offset`` -> ``conv2_offset``) are mapped by name and shape only.
"""
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from detectron2.modeling.backbone.swin import WindowAttention
from detectron2.utils.file_io import PathManager

from .checkpoint import load_torch_file
from .teacher import build_teacher_model

__all__ = [
    "AUTHOR", "ConversionError", "ConversionReport", "check_against_model",
    "convert_mmdet_state_dict", "convert_teacher", "load_mmdet_checkpoint",
]

AUTHOR = "pkd.convert_teacher"

_B = "backbone.bottom_up."
_NORM = r"(?:bn|gn)"  # mmcv names a norm layer by its type and position: bn1, gn1, bn, gn
_NORM_LEAF = r"(?P<leaf>weight|bias|running_mean|running_var)"
_CONV_MODULE = rf"(?P<i>\d+)\.(?P<kind>conv|{_NORM})\.{_NORM_LEAF}"  # i-th mmcv ConvModule
_TOWERS = {"cls": "cls_subnet", "reg": "bbox_subnet"}

# Source tensors left out on purpose, with the reason the summary gives.
_SKIP_ALWAYS = [
    (r".*\.num_batches_tracked", "BatchNorm step counters (FrozenBN has none)"),
    (r"(?:rpn_head|roi_head)\..*", "R-CNN RPN/RoI heads: distillation runs backbone+FPN only"),
]
_SKIP_HEAD = (r"bbox_head\..*", "dense head not requested (--with-head converts it)")
_FCOS_SCALE = r"bbox_head\.scales\.\d+\.scale"


class ConversionError(ValueError):
    """The source checkpoint cannot be converted completely and exactly."""


@dataclass
class ConversionReport:
    """What happened to every tensor: converted (target <- source), skipped by choice (source ->
    reason), synthesized (target -> why), and notes on behaviour the weights cannot carry."""

    converted: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    synthesized: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        counts = (len(self.converted), len(self.skipped), len(self.synthesized))
        lines = ["Converted %d tensors, skipped %d by choice, synthesized %d." % counts]
        by_reason: Dict[str, List[str]] = {}
        for key, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"Skipped by choice ({len(keys)}): {reason}")
            lines += [f"    {k}" for k in keys]
        for key, why in self.synthesized.items():
            lines.append(f"Synthesized {key}: {why}")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


# A rule: (regex that must match the whole source key, target template for Match.expand or a
# function of the match, optional tensor transform).
Rule = Tuple[str, Union[str, Callable[[re.Match], str]], Optional[Callable[[Tensor], Tensor]]]


def _unfold_to_concat_order(t: Tensor) -> Tensor:
    """Reorders the last dim (4C) from MMDetection's unfold order (``c * 4 + q``, ``q = kh*2+kw``)
    to Detectron2's concatenation order (``p * C + c``, sub-grids (0,0), (1,0), (0,1), (1,1))."""
    c = t.shape[-1] // 4
    t = t.reshape(*t.shape[:-1], c, 4)[..., [0, 2, 1, 3]]
    return t.transpose(-1, -2).reshape(*t.shape[:-2], 4 * c).contiguous()


def _check_relative_position_index(t: Tensor) -> Tensor:
    """The index is a constant of the window size; refuse a checkpoint whose index differs from
    the one Detectron2's WindowAttention builds (it would mean a different bias-table layout)."""
    window = math.isqrt(t.shape[0])
    expected = WindowAttention(1, (window, window), num_heads=1).relative_position_index
    if t.shape != expected.shape or not torch.equal(t.to(expected.dtype), expected):
        raise ConversionError(
            f"Swin relative_position_index for window {window} differs from Detectron2's: the "
            "relative_position_bias_table would be read in another order."
        )
    return expected


def _swin_rules() -> List[Rule]:
    block = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
    to_block = _B + r"layers.\1.blocks.\2."
    return [
        (r"backbone\.patch_embed\.projection\.(weight|bias)", _B + r"patch_embed.proj.\1", None),
        (r"backbone\.patch_embed\.norm\.(weight|bias)", _B + r"patch_embed.norm.\1", None),
        (block + r"(norm[12])\.(weight|bias)", to_block + r"\3.\4", None),
        (block + r"attn\.w_msa\.(qkv|proj)\.(weight|bias)", to_block + r"attn.\3.\4", None),
        (block + r"attn\.w_msa\.(relative_position_bias_table)", to_block + r"attn.\3", None),
        # A buffer: a constant of the window size, verified rather than trusted.
        (
            block + r"attn\.w_msa\.(relative_position_index)",
            to_block + r"attn.\3",
            _check_relative_position_index,
        ),
        (block + r"ffn\.layers\.0\.0\.(weight|bias)", to_block + r"mlp.fc1.\3", None),
        (block + r"ffn\.layers\.1\.(weight|bias)", to_block + r"mlp.fc2.\3", None),
        # Patch merging belongs to stage i in both; its 4C channels are reordered.
        (
            r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
            _B + r"layers.\1.downsample.\2",
            _unfold_to_concat_order,
        ),
        (r"backbone\.norm(\d+)\.(weight|bias)", _B + r"norm\1.\2", None),
    ]


def _resnet_rules() -> List[Rule]:
    block = r"backbone\.layer(?P<layer>\d)\.(?P<block>\d+)\."

    def res(tail: str) -> Callable[[re.Match], str]:
        # MMDetection's layer1..layer4 are Detectron2's res2..res5.
        return lambda m: f"{_B}res{int(m['layer']) + 1}.{m['block']}." + tail.format_map(m)

    return [
        (r"backbone\.conv1\.weight", _B + "stem.conv1.weight", None),
        (rf"backbone\.{_NORM}1\.{_NORM_LEAF}", _B + r"stem.conv1.norm.\g<leaf>", None),
        # DCN: mmcv's DeformConv2dPack keeps its offset conv inside conv2.
        (block + r"conv2\.conv_offset\.(?P<leaf>weight|bias)", res("conv2_offset.{leaf}"), None),
        (block + r"conv(?P<i>\d)\.weight", res("conv{i}.weight"), None),
        (block + rf"{_NORM}(?P<i>\d)\.{_NORM_LEAF}", res("conv{i}.norm.{leaf}"), None),
        (block + r"downsample\.0\.weight", res("shortcut.weight"), None),
        (block + rf"downsample\.1\.{_NORM_LEAF}", res("shortcut.norm.{leaf}"), None),
    ]


def _conv_module(prefix: str, m: re.Match) -> str:
    """mmcv ConvModule ``conv.*`` / ``bn.*``, ``gn.*`` -> Detectron2 Conv2d ``*`` / ``norm.*``."""
    return f"{prefix}.{'' if m['kind'] == 'conv' else 'norm.'}{m['leaf']}"


def _fpn_rules(first_level: int, num_laterals: int) -> List[Rule]:
    """``neck.lateral_convs.i`` / ``fpn_convs.i`` -> ``fpn_lateral{first_level+i}`` /
    ``fpn_output{first_level+i}``; the extra convs after them (``add_extra_convs``) -> P6, P7."""

    def output(m: re.Match) -> str:
        i = int(m["i"])
        if i < num_laterals:
            return _conv_module(f"backbone.fpn_output{first_level + i}", m)
        if i - num_laterals < 2 and m["kind"] == "conv":
            return f"backbone.top_block.p{6 + i - num_laterals}.{m['leaf']}"
        raise ConversionError(
            f"neck.fpn_convs.{i}: Detectron2's LastLevelP6P7 has two plain convs (P6, P7) after "
            f"the {num_laterals} FPN outputs; this extra level/norm has no counterpart."
        )

    def lateral(m: re.Match) -> str:
        return _conv_module(f"backbone.fpn_lateral{first_level + int(m['i'])}", m)

    return [
        (r"neck\.lateral_convs\." + _CONV_MODULE, lateral, None),
        (r"neck\.fpn_convs\." + _CONV_MODULE, output, None),
    ]


def _head_rules(norm_in_towers: bool, anchor_grid: Tuple[int, int]) -> List[Rule]:
    """RetinaHead / FCOSHead -> Detectron2's RetinaNetHead / FCOSHead (``head.*``)."""
    step = 3 if norm_in_towers else 2  # Detectron2's towers: conv, [norm], ReLU per layer
    num_sizes, num_ratios = anchor_grid

    def size_major(t: Tensor) -> Tensor:
        # (ratio, size, k) -> (size, ratio, k) over the output channels.
        grouped = t.reshape(num_ratios, num_sizes, -1, *t.shape[1:])
        return grouped.transpose(0, 1).reshape(t.shape).contiguous()

    def tower(m: re.Match) -> str:
        layer = step * int(m["i"]) + (m["kind"] != "conv")
        return f"head.{_TOWERS[m['t']]}.{layer}.{m['leaf']}"

    return [
        (r"bbox_head\.(?P<t>cls|reg)_convs\." + _CONV_MODULE, tower, None),
        (r"bbox_head\.retina_cls\.(weight|bias)", r"head.cls_score.\1", size_major),
        (r"bbox_head\.retina_reg\.(weight|bias)", r"head.bbox_pred.\1", size_major),
        # FCOSHead: conv_* since MMDetection 2.x's AnchorFreeHead, fcos_* before it.
        (r"bbox_head\.(?:conv|fcos)_cls\.(weight|bias)", r"head.cls_score.\1", None),
        (r"bbox_head\.(?:conv|fcos)_reg\.(weight|bias)", r"head.bbox_pred.\1", None),
        (r"bbox_head\.(?:conv|fcos)_centerness\.(weight|bias)", r"head.ctrness.\1", None),
    ]


def _stage_channels(state: Dict[str, Tensor]) -> List[int]:
    """Output channels of the backbone's stages (stage i has stride 2**(i+2) in both Swin and
    ResNet, i.e. Detectron2 FPN level i+2)."""
    swin, resnet = {}, {}
    for key, value in state.items():
        if m := re.fullmatch(r"backbone\.stages\.(\d+)\.blocks\.0\.norm1\.weight", key):
            swin[int(m[1])] = value.shape[0]
        elif m := re.fullmatch(r"backbone\.layer(\d)\.0\.conv(\d)\.weight", key):
            # A block's last conv (conv2 basic, conv3 bottleneck) gives the stage's width.
            resnet[int(m[1])] = max(resnet.get(int(m[1]), (0, 0)), (int(m[2]), value.shape[0]))
    if swin:
        return [swin[i] for i in sorted(swin)]
    if resnet:
        return [resnet[i][1] for i in sorted(resnet)]
    raise ConversionError("No MMDetection Swin or ResNet/ResNeXt backbone in the checkpoint.")


def _fpn_layout(state: Dict[str, Tensor], first_level: Optional[int]) -> Tuple[int, int]:
    """(Detectron2 level of lateral 0, number of laterals); MMDetection's ``start_level`` is
    inferred from the lateral count (laterals end at the last stage) unless ``first_level``."""
    laterals = {
        int(m[1]): v.shape[1]
        for k, v in state.items()
        if (m := re.fullmatch(r"neck\.lateral_convs\.(\d+)\.conv\.weight", k))
    }
    in_channels = [laterals[i] for i in sorted(laterals)]
    if not in_channels:
        raise ConversionError("No MMDetection FPN (neck.lateral_convs.*) in the checkpoint.")
    stages = _stage_channels(state)
    first_stage = len(stages) - len(in_channels) if first_level is None else first_level - 2
    expected = stages[first_stage : first_stage + len(in_channels)]
    if first_stage < 0 or expected != in_channels:
        raise ConversionError(
            f"FPN lateral inputs {in_channels} do not match backbone stages {stages} starting at "
            f"Detectron2 level {first_stage + 2}; pass the right --fpn-first-level."
        )
    return first_stage + 2, len(in_channels)


def convert_mmdet_state_dict(
    state: Dict[str, Tensor],
    *,
    with_head: bool = False,
    drop_fcos_scales: bool = False,
    fpn_first_level: Optional[int] = None,
    anchor_grid: Tuple[int, int] = (3, 3),
) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Renames (and re-lays-out) an MMDetection ``state_dict`` into Detectron2 names.

    Args:
        state: the checkpoint's ``"state_dict"``.
        with_head: also convert the dense head (RetinaHead / FCOSHead) to ``head.*``.
        drop_fcos_scales: accept losing FCOS's per-level ``scales`` (otherwise an error).
        fpn_first_level: Detectron2 level of the first FPN lateral (2 when the FPN starts at
            res2/Swin stage 0, 3 at res3); inferred from the checkpoint when None.
        anchor_grid: (sizes, ratios) per location of a RetinaNet head (MMDetection's
            ``scales_per_octave`` and ``len(ratios)``).

    Returns:
        (Detectron2 state dict, report). Raises ConversionError on any key no rule covers.
    """
    report = ConversionReport()
    rules = _swin_rules() + _resnet_rules() + _fpn_rules(*_fpn_layout(state, fpn_first_level))
    skips = list(_SKIP_ALWAYS)
    if with_head:
        _check_dense_head(state, anchor_grid)
        norm_in_towers = _has_key(state, rf"bbox_head\.cls_convs\.\d+\.{_NORM}\..*")
        rules += _head_rules(norm_in_towers, anchor_grid)
        skips += _fcos_scales_skip(state, drop_fcos_scales, report)
    else:
        skips.append(_SKIP_HEAD)

    weights, unknown = {}, []
    for key, value in state.items():
        reason = next((r for pattern, r in skips if re.fullmatch(pattern, key)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        for pattern, target, transform in rules:  # the first matching rule applies
            if m := re.fullmatch(pattern, key):
                target = target(m) if callable(target) else m.expand(target)
                weights[target] = transform(value) if transform else value
                report.converted[target] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} source tensors match no conversion rule: {unknown[:10]}. They would "
            "be silently lost; this checkpoint is not one of the supported MMDetection teachers "
            "(Swin / ResNet / ResNeXt + FPN, RetinaNet / FCOS heads)."
        )
    _add_zero_biases(weights, report)
    if any(k.startswith("backbone.top_block.p7.") for k in weights):
        report.notes.append(
            "P7: Detectron2 applies ReLU before the P7 conv; MMDetection does so only with "
            "relu_before_extra_convs=True (its FCOS configs, not its RetinaNet configs)."
        )
    return weights, report


def _has_key(state: Dict[str, Tensor], pattern: str) -> bool:
    return any(re.fullmatch(pattern, k) for k in state)


def _check_dense_head(state: Dict[str, Tensor], anchor_grid: Tuple[int, int]) -> None:
    if "bbox_head.retina_reg.weight" in state:
        anchors = state["bbox_head.retina_reg.weight"].shape[0] // 4
        if anchors != anchor_grid[0] * anchor_grid[1]:
            raise ConversionError(
                f"The RetinaNet head has {anchors} anchors per location, not "
                f"{anchor_grid[0]}x{anchor_grid[1]} (sizes x ratios): pass the right anchor grid."
            )
    elif not _has_key(state, r"bbox_head\.(?:conv|fcos)_centerness\.weight"):
        raise ConversionError(
            "--with-head needs a RetinaNet or FCOS dense head (bbox_head.retina_* or "
            "bbox_head.conv_*); this checkpoint has none (an R-CNN teacher has no dense head)."
        )


def _fcos_scales_skip(state: Dict[str, Tensor], drop: bool, report: ConversionReport) -> list:
    """MMDetection FCOS's learned per-level ``scales``: an error, or skip rules with ``drop``."""
    values = [round(float(v), 4) for k, v in state.items() if re.fullmatch(_FCOS_SCALE, k)]
    if not values:
        return []
    if not drop:
        raise ConversionError(
            f"MMDetection FCOS multiplies each level's box regression by a learned scale {values}; "
            "Detectron2's FCOSHead has none, and its shared bbox_pred conv cannot absorb "
            "per-level factors. Pass --drop-fcos-scales to convert anyway (teacher box "
            "predictions then differ by these factors), or convert without --with-head."
        )
    report.notes.append(
        f"FCOS scales {values} dropped; the head is exact only for an MMDetection FCOS trained "
        "with norm_on_bbox=True, centerness_on_reg=True and scales of 1."
    )
    return [(_FCOS_SCALE, "FCOS per-level scales: no Detectron2 counterpart (--drop-fcos-scales)")]


def _add_zero_biases(weights: Dict[str, Tensor], report: ConversionReport) -> None:
    """Detectron2's head tower convs always have a bias; MMDetection omits it next to a norm."""
    for key in list(weights):
        if m := re.fullmatch(r"(head\.(?:cls|bbox)_subnet\.\d+)\.weight", key):
            bias = f"{m[1]}.bias"
            if weights[key].dim() == 4 and bias not in weights:
                weights[bias] = weights[key].new_zeros(weights[key].shape[0])
                report.synthesized[bias] = "zeros: the MMDetection conv has no bias (norm follows)"


def check_against_model(
    weights: Dict[str, Tensor], model: nn.Module, parts: Sequence[str] = ("backbone",)
) -> None:
    """Raises ConversionError unless ``weights`` fill every parameter/buffer of ``parts`` of
    ``model`` with the right shape and hold nothing ``model`` lacks. BatchNorm's
    ``num_batches_tracked`` counters are exempt (PyTorch re-creates them when absent)."""
    target = model.state_dict()
    prefixes = tuple(f"{p}." for p in parts)
    unused = [k for k in weights if k not in target]
    unfilled = [
        k
        for k in target
        if k.startswith(prefixes) and k not in weights and not k.endswith("num_batches_tracked")
    ]
    shapes = [
        f"{k}: converted {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in weights.items()
        if k in target and v.shape != target[k].shape
    ]
    problems = [
        f"{len(keys)} {what}, e.g. {keys[:5]}"
        for keys, what in [
            (unused, "converted tensors are not in the model"),
            (unfilled, "model tensors are left unfilled"),
            (shapes, "shape mismatches"),
        ]
        if keys
    ]
    if problems:
        raise ConversionError(
            "The converted checkpoint does not fit the teacher model: " + "; ".join(problems)
            + ". Make the teacher config describe the MMDetection model (depth, widths, groups, "
            "FPN levels, head convs/classes/anchors)."
        )


def load_mmdet_checkpoint(path: str) -> Tuple[Dict[str, Tensor], str]:
    """Reads an MMDetection checkpoint safely (``pkd.checkpoint``'s loader: weights_only unless
    PKD_ALLOW_UNSAFE_CHECKPOINTS=1). Returns (its ``state_dict``, the file's sha256)."""
    local = PathManager.get_local_path(path)
    sha256 = hashlib.sha256()
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
    loaded = load_torch_file(local)
    state = loaded.get("state_dict") if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        keys = list(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise ConversionError(
            f"'{path}' is not an MMDetection checkpoint: it has no 'state_dict' (found {keys})."
        )
    return state, sha256.hexdigest()


def convert_teacher(
    src: str,
    out: str,
    *,
    config: Optional[str] = None,
    opts: Sequence[str] = (),
    with_head: bool = False,
    **kwargs,
) -> ConversionReport:
    """Converts MMDetection checkpoint ``src`` and saves the Detectron2 checkpoint ``out``.

    With ``config`` (a teacher config for :func:`pkd.teacher.build_teacher_model`, plus ``opts``)
    the result is checked against the built model: its backbone (and head with ``with_head``)
    filled exactly. ``kwargs`` go to :func:`convert_mmdet_state_dict`.
    """
    if out.endswith(".pkl"):
        raise ConversionError(f"'{out}': Detectron2 reads .pkl files as pickled numpy; use .pth.")
    state, sha256 = load_mmdet_checkpoint(src)
    weights, report = convert_mmdet_state_dict(state, with_head=with_head, **kwargs)
    if config:
        model, _ = build_teacher_model(config, opts, device="cpu")
        check_against_model(weights, model, ("backbone", "head") if with_head else ("backbone",))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    source = {"path": os.path.abspath(src), "sha256": sha256, "format": "mmdet"}
    torch.save(
        {"model": weights, "__author__": AUTHOR, "source": source, "matching_heuristics": False},
        out,
    )
    return report
