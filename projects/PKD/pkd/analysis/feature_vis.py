"""Pictures of what distillation compares: teacher and student feature maps side by side
(channel-mean |x| heat maps) and per-channel Pearson correlation histograms.

One rendering path for TensorBoard (:func:`put_feature_images`, every ``VIS_PERIOD`` iterations)
and for ``tools/report_distill.py``. Matplotlib's Agg canvas is used directly (no pyplot, no
global backend switch), so it renders in any process, with or without a display."""
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from detectron2.data.detection_utils import convert_image_to_rgb

__all__ = [
    "FeatureColumn",
    "channel_mean_abs",
    "figure_to_rgb",
    "input_images_rgb",
    "pair_title",
    "render_feature_pair",
    "render_pcc_histograms",
    "put_feature_images",
    "VIS_IMAGES",
]

# Training batches: the first this many images of the batch are drawn.
VIS_IMAGES = 2
_PANEL_INCHES = 2.1
_DPI = 80
_CMAP = "inferno"


@dataclass
class FeatureColumn:
    """One column of a feature picture: a model's maps of one level.

    Attributes:
        label: column title, e.g. "teacher p2".
        maps: (N, C, H, W) maps of a padded batch (detached or not).
        stride: the level's stride in input pixels (crops each image's padding away).
    """

    label: str
    maps: Tensor
    stride: int


def channel_mean_abs(maps: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H, W): mean over channels of |x|, in fp32 on the CPU."""
    return maps.detach().float().abs().mean(dim=1).cpu()


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Renders a matplotlib Figure to an (H, W, 3) uint8 RGB array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def input_images_rgb(batched_inputs: Sequence[Dict], input_format: str) -> List[np.ndarray]:
    """The (H, W, 3) uint8 RGB pictures of Detectron2 inputs whose ``image`` is (C, H, W) in
    ``input_format``."""
    return [
        np.ascontiguousarray(
            convert_image_to_rgb(x["image"].permute(1, 2, 0).cpu().numpy(), input_format)
        ).clip(0, 255).astype(np.uint8)
        for x in batched_inputs
    ]


def pair_title(
    student_level: str, teacher_level: str, student_stride: int, teacher_stride: int
) -> str:
    """A feature pair's picture title: "student p3 (stride 8) <- teacher p2 (stride 4)"."""
    return (f"student {student_level} (stride {student_stride}) <- "
            f"teacher {teacher_level} (stride {teacher_stride})")


def render_feature_pair(
    title: str,
    columns: Sequence[FeatureColumn],
    image_sizes: Sequence[Tuple[int, int]],
    images: Optional[Sequence[np.ndarray]] = None,
) -> np.ndarray:
    """One picture of one feature pair: a row per image, a column per model (the input image
    first when given), each map drawn as its channel-mean |x| over the image's own (unpadded)
    area, with its own colour scale (the models' magnitudes differ; PKD compares the maps after
    standardising each channel, so the pattern is what matters).

    Args:
        title: picture title, e.g. "student p3 <- teacher p2".
        columns: the maps to draw, all of the same batch.
        image_sizes: per image, (h, w) of the image in the padded input batch.
        images: per image, an (h, w, 3) uint8 RGB picture, or None.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    num_images = len(image_sizes)
    heat = [channel_mean_abs(c.maps[:num_images]) for c in columns]
    num_cols = len(columns) + (images is not None)
    figure = Figure(
        figsize=(_PANEL_INCHES * num_cols, _PANEL_INCHES * num_images + 0.5), dpi=_DPI
    )
    figure.suptitle(title, fontsize=11)
    axes = figure.subplots(num_images, num_cols, squeeze=False)
    for row, (h, w) in enumerate(image_sizes):
        col = 0
        if images is not None:
            ax = axes[row, 0]
            ax.imshow(images[row][:h, :w])
            ax.set_title("input" if row == 0 else "", fontsize=9)
            col = 1
        for column, maps in zip(columns, heat):
            ax = axes[row, col]
            valid = maps[row, : math.ceil(h / column.stride), : math.ceil(w / column.stride)]
            shown = ax.imshow(valid.numpy(), cmap=_CMAP, interpolation="nearest")
            colorbar = figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            colorbar.ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(column.label, fontsize=9)
            col += 1
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"image {row}", fontsize=9)
    figure.tight_layout()
    return figure_to_rgb(figure)


def render_pcc_histograms(
    levels: Sequence[str], series: Mapping[str, Sequence[Optional[Tensor]]]
) -> np.ndarray:
    """Histograms of the per-channel Pearson correlation with the teacher, one panel per level.

    Args:
        levels: the student levels, e.g. ["p3", "p4"].
        series: {label: per level, (C,) correlations or None}, e.g. {"distilled": [...],
            "no KD": [...]}; series are overlaid.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    figure = Figure(figsize=(3.2 * len(levels), 2.8), dpi=_DPI)
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    bins = np.linspace(-1.0, 1.0, 41)
    for i, (level, ax) in enumerate(zip(levels, axes)):
        for label, values in series.items():
            if values[i] is None:
                continue
            r = values[i].float().cpu().numpy()
            ax.hist(r, bins=bins, alpha=0.55, label=f"{label} (mean {r.mean():.2f})")
        ax.set_title(f"student {level}", fontsize=10)
        ax.set_xlabel("per-channel Pearson r with the teacher", fontsize=8)
        ax.set_xlim(-1, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("channels", fontsize=8)
    figure.tight_layout()
    return figure_to_rgb(figure)


@torch.no_grad()
def put_feature_images(
    storage,
    batched_inputs: Sequence[Dict],
    levels: Sequence[Tuple[str, str]],
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    strides: Sequence[Tuple[int, int]],
    input_format: str,
) -> None:
    """Puts one picture per feature pair (:func:`render_feature_pair` on the first VIS_IMAGES
    images of the batch) into Detectron2's event storage as ``kd/features_<student_level>``,
    which its TensorBoard writer shows.

    Args:
        levels: the (student_level, teacher_level) pairs.
        student_features, teacher_features: per pair, (N, C, H, W).
        strides: per pair, (student stride, teacher stride).
        input_format: the format of ``x["image"]`` (the student's INPUT.FORMAT).
    """
    inputs = list(batched_inputs[:VIS_IMAGES])
    image_sizes = [tuple(x["image"].shape[-2:]) for x in inputs]
    images = input_images_rgb(inputs, input_format)
    for (s_level, t_level), s, t, (s_stride, t_stride) in zip(
        levels, student_features, teacher_features, strides
    ):
        picture = render_feature_pair(
            f"{pair_title(s_level, t_level, s_stride, t_stride)}, iteration {storage.iter}",
            [FeatureColumn(f"teacher {t_level}", t, t_stride),
             FeatureColumn(f"student {s_level}", s, s_stride)],
            image_sizes,
            images,
        )
        storage.put_image(
            f"kd/features_{s_level}", torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0
        )
