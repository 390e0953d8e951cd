"""The frozen teacher: built from its own config, loaded strictly, frozen by construction, and fed
the student's images re-normalised the teacher's way."""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList

from .checkpoint import CheckpointLoadError, StrictCheckpointer
from .config import PROJECT_CONFIGS, get_distill_cfg
from .losses.base import DenseHeadOutputs
from .students import capture_tower_taps, dense_head_outputs

__all__ = [
    "FrozenTeacher",
    "TeacherCheckpointError",
    "build_teacher_model",
    "load_teacher",
    "load_teacher_config",
    "resolve_teacher_config",
    "RANDOM_WEIGHTS",
]

logger = logging.getLogger(__name__)

# Explicit opt-in to an untrained teacher (tests); anything else must be a real checkpoint.
RANDOM_WEIGHTS = "random"


class TeacherCheckpointError(CheckpointLoadError):
    """The teacher checkpoint is missing or does not fit the teacher model."""


def _split_overrides(opts: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Accepts yacs ``KEY VALUE`` pairs or ``key=value`` items; returns both forms."""
    opts = [str(o) for o in opts]
    if all("=" in o for o in opts):
        kv = opts
        flat = [part for o in opts for part in o.split("=", 1)]
    else:
        if len(opts) % 2:
            raise ValueError(
                f"MODEL.DISTILL.TEACHER.OPTS={opts} has an odd length: give KEY VALUE pairs "
                "(yacs style) or key=value items."
            )
        flat = opts
        kv = [f"{k}={v}" for k, v in zip(opts[::2], opts[1::2])]
    return flat, kv


def resolve_teacher_config(config: str) -> str:
    """The file a ``MODEL.DISTILL.TEACHER.CONFIG`` value names, resolved the same way from any
    working directory for the shipped configs:

    - an absolute path: that file;
    - a relative path: the file relative to the working directory, else relative to the
      project's ``configs/`` directory (:data:`pkd.config.PROJECT_CONFIGS`; the shipped configs
      write e.g. ``teachers/MaskRCNN-SwinS-FPN-3x.yaml``); if both exist and differ, an error
      (give an absolute path);
    - else a Detectron2 model-zoo config name (``COCO-Detection/retinanet_R_50_FPN_1x.yaml``).

    Returns:
        the absolute path of the teacher's ``.yaml``/``.py`` config.
    """
    if not config:
        raise ValueError(
            "MODEL.DISTILL.TEACHER.CONFIG is empty: name the teacher's config file (.yaml or .py)."
        )
    if os.path.isabs(config):
        found = [config] if os.path.isfile(config) else []
    else:
        found = [p for p in (os.path.abspath(config), os.path.join(PROJECT_CONFIGS, config))
                 if os.path.isfile(p)]
    if len(found) == 2 and not os.path.samefile(*found):
        raise ValueError(
            f"Teacher config '{config}' is ambiguous: both {found[0]} (working directory) and "
            f"{found[1]} (the project's configs/) exist. Set MODEL.DISTILL.TEACHER.CONFIG to the "
            "absolute path of the one you mean."
        )
    if found:
        return os.path.normpath(found[-1])
    if not os.path.isabs(config) and not os.path.normpath(config).startswith(os.pardir):
        from detectron2 import model_zoo  # imported lazily: it warns at import

        try:
            return model_zoo.get_config_file(config)
        except RuntimeError:
            pass
    raise FileNotFoundError(
        f"Teacher config '{config}' was not found: it is neither a file (absolute, or relative to "
        f"the working directory '{os.getcwd()}' or to the project's configs directory "
        f"'{PROJECT_CONFIGS}', e.g. 'teachers/MaskRCNN-SwinS-FPN-3x.yaml') nor a Detectron2 "
        "model-zoo config name. Set MODEL.DISTILL.TEACHER.CONFIG to an existing .yaml/.py file."
    )


def load_teacher_config(config: str, opts: Sequence[str] = ()):
    """Loads a teacher config (yacs ``.yaml`` or LazyConfig ``.py``) and applies ``opts``.

    Returns:
        (cfg, kind): the loaded config and ``"yacs"`` or ``"lazy"``.
    """
    path = resolve_teacher_config(config)
    flat, kv = _split_overrides(opts)
    if path.endswith(".py"):
        cfg = LazyConfig.load(path)
        return LazyConfig.apply_overrides(cfg, kv), "lazy"
    cfg = get_distill_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(flat)
    return cfg, "yacs"


def build_teacher_model(config: str, opts: Sequence[str] = (), device: Optional[str] = None):
    """Builds (untrained) the detector a teacher config describes.

    Returns:
        (model, input_format)
    """
    cfg, kind = load_teacher_config(config, opts)
    if kind == "lazy":
        model = instantiate(cfg.model)
        input_format = getattr(model, "input_format", None) or _lazy_input_format(cfg)
    else:
        if device is not None:
            cfg.MODEL.DEVICE = device
        if cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
            raise ValueError(f"Teacher config {config} is itself a distillation config.")
        model = build_model(cfg)
        input_format = cfg.INPUT.FORMAT
    if device is not None:
        model.to(device)
    return model, input_format


def _lazy_input_format(cfg) -> str:
    try:
        return cfg.dataloader.train.mapper.image_format
    except (AttributeError, KeyError):
        return "BGR"


def load_teacher_weights(
    model: nn.Module, weights: str, required_parts: Sequence[str] = ("backbone",)
) -> None:
    """Loads ``weights`` into ``model``. Every parameter and buffer of ``required_parts`` (the
    submodules distillation runs: the backbone+FPN, and the dense head for prediction-guided
    losses) must be in the checkpoint with the right shape; a wrong shape anywhere is an error."""
    if weights == RANDOM_WEIGHTS:
        logger.warning("Teacher keeps RANDOM weights (MODEL.DISTILL.TEACHER.WEIGHTS='random').")
        return
    if not weights:
        raise TeacherCheckpointError(
            "MODEL.DISTILL.TEACHER.WEIGHTS is empty: give the trained teacher's checkpoint. "
            "(Only the explicit value 'random' trains against an untrained teacher, for tests.)"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise TeacherCheckpointError(
            f"Teacher checkpoint '{weights}' does not exist (working directory: {os.getcwd()}). "
            "Set MODEL.DISTILL.TEACHER.WEIGHTS to the teacher's trained weights."
        )
    StrictCheckpointer(
        model,
        required=[f"{part}." for part in required_parts],
        subject="the teacher model",
        fix="Point MODEL.DISTILL.TEACHER.WEIGHTS at weights trained with "
        "MODEL.DISTILL.TEACHER.CONFIG (or fix the config/OPTS to match the checkpoint).",
        error=TeacherCheckpointError,
    ).load(weights, checkpointables=[])


class FrozenTeacher(nn.Module):
    """A trained detector used only as a feature (and, if asked, prediction) source.

    Frozen by construction: ``requires_grad=False`` everywhere, BatchNorm turned into
    FrozenBatchNorm2d, always in eval mode (``train(True)`` is ignored), forward under no_grad.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weights: str,
        input_format: str = "BGR",
        required_parts: Sequence[str] = ("backbone",),
        config: Optional[str] = None,
    ):
        """
        Args:
            model: an untrained Detectron2 detector whose ``backbone`` returns a dict of maps.
            weights: checkpoint to load strictly, or ``"random"`` (tests only).
            input_format: the channel order the teacher was trained with ("BGR"/"RGB").
            required_parts: submodules the checkpoint must cover: ("backbone",) for feature
                losses, ("backbone", "head") when a loss needs the teacher's dense predictions.
            config: the config file the teacher was built from (kept for logs and checks).
        """
        super().__init__()
        if not hasattr(model, "backbone") or not hasattr(model.backbone, "output_shape"):
            raise TypeError(
                f"Teacher {type(model).__name__} has no Detectron2 backbone with output_shape(): "
                "a teacher must be a Detectron2 detector with an FPN-style backbone."
            )
        load_teacher_weights(model, weights, required_parts)
        model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
        model.requires_grad_(False)
        self.model = model
        self.input_format = input_format
        self.weights = weights
        self.required_parts = tuple(required_parts)
        self.config = config
        super().train(False)

    def train(self, mode: bool = True):
        # The teacher is never trained: keep eval-mode behaviour (BN, dropout, inference paths).
        return super().train(False)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.model.backbone.output_shape()

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def preprocess(
        self,
        batched_inputs: List[Dict[str, Tensor]],
        student_format: str,
        padded_size: Tuple[int, int],
    ) -> Tensor:
        """Builds the teacher's input batch from the raw images the student saw.

        Args:
            batched_inputs: Detectron2 inputs; ``x["image"]`` is (C, Hi, Wi) in ``student_format``.
            student_format: the student's ``INPUT.FORMAT``.
            padded_size: (H, W) of the student's padded batch; the teacher's batch is padded to it
                (rounded up to the teacher's size divisibility), so that features align.

        Returns:
            Tensor (N, C, H', W'): normalised with the teacher's pixel mean/std, zero-padded.
        """
        model = self.model
        reorder = _channel_reorder(student_format, self.input_format)
        images = []
        for x in batched_inputs:
            image = x["image"].to(model.pixel_mean.device)
            if reorder:
                image = image.flip(0)
            images.append((image - model.pixel_mean) / model.pixel_std)
        backbone = model.backbone
        batch = ImageList.from_tensors(
            images, backbone.size_divisibility, padding_constraints=backbone.padding_constraints
        ).tensor
        divisibility = max(backbone.size_divisibility, 1)
        target_h = -(-padded_size[0] // divisibility) * divisibility
        target_w = -(-padded_size[1] // divisibility) * divisibility
        pad_h, pad_w = target_h - batch.shape[-2], target_w - batch.shape[-1]
        if pad_h > 0 or pad_w > 0:
            batch = F.pad(batch, [0, max(pad_w, 0), 0, max(pad_h, 0)])
        return batch

    @torch.no_grad()
    def features(self, images: Tensor) -> Dict[str, Tensor]:
        """Backbone(+FPN) maps of a preprocessed batch: {level: (N, C, H, W)}, no grad."""
        return self.model.backbone(images)

    @torch.no_grad()
    def detect(self, batched_inputs: List[Dict[str, Tensor]], student_format: str) -> List[Dict]:
        """The teacher's detections on the student's images, fed the way distillation feeds it
        (:meth:`preprocess`), then the teacher's own inference pieces and Detectron2's
        ``detector_postprocess``; what a sound teacher gives here equals its own forward on its
        own data path.

        Args:
            batched_inputs: Detectron2 test inputs; ``x["image"]`` (C, Hi, Wi) in
                ``student_format``, ``height``/``width`` (optional) the output resolution.

        Returns:
            per image ``{"instances": Instances}`` (``pred_boxes``, ``scores``, ``pred_classes``),
            as a Detectron2 detector's inference returns.
        """
        model = self.model
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        padded_size = tuple(max(size[i] for size in image_sizes) for i in (0, 1))
        images = self.preprocess(batched_inputs, student_format, padded_size)
        images = ImageList(images, image_sizes)
        features = model.backbone(images.tensor)
        if isinstance(model, GeneralizedRCNN) and model.proposal_generator is not None:
            proposals, _ = model.proposal_generator(images, features, None)
            results, _ = model.roi_heads(images, features, proposals, None)
        elif isinstance(model, DenseDetector):
            head_features = [features[f] for f in model.head_in_features]
            results = model.forward_inference(images, head_features, model.head(head_features))
        else:
            raise TypeError(
                f"Cannot run the detections of a {type(model).__name__} teacher: supported are "
                "GeneralizedRCNN with a proposal generator and dense detectors (RetinaNet, FCOS)."
            )
        return [
            {"instances": detector_postprocess(r, x.get("height", h), x.get("width", w))}
            for r, x, (h, w) in zip(results, batched_inputs, image_sizes)
        ]

    def check_dense(self) -> None:
        """Raises unless the teacher has a dense head (RetinaNet, FCOS, ...) loaded from its
        checkpoint."""
        if self.weights != RANDOM_WEIGHTS and "head" not in self.required_parts:
            raise ValueError(
                "A prediction-guided loss runs the teacher's dense head, but the teacher was "
                f"loaded with required_parts={self.required_parts}, so its head may be untrained. "
                "Load it with required_parts=('backbone', 'head') (LazyConfig: "
                "L(load_teacher)(..., required_parts=['backbone', 'head']))."
            )
        if not isinstance(self.model, DenseDetector):
            raise TypeError(
                f"The teacher is a {type(self.model).__name__}, which has no dense head: "
                "prediction-guided losses (PGD, RM, PFI) need a dense teacher such as RetinaNet "
                "or FCOS. Use a feature loss (PKD, MSE, FGD) with this teacher."
            )

    @torch.no_grad()
    def dense_head(self, features: Dict[str, Tensor]) -> DenseHeadOutputs:
        """Runs the teacher's own dense head on its backbone maps, with its own anchors, and
        decodes its boxes with its own box transform.

        Args:
            features: the teacher's backbone dict {level: (N, C, Hl, Wl)}.

        Returns:
            the head's material, ``boxes`` included (N, R, 4).
        """
        self.check_dense()
        model = self.model
        head_features = [features[f] for f in model.head_in_features]
        with capture_tower_taps(model.head) as taps:
            head_outputs = model.head(head_features)
        return dense_head_outputs(
            model, head_outputs, taps, model.anchor_generator(head_features), decode_boxes=True
        )


def load_teacher(
    config: str,
    weights: str,
    opts: Sequence[str] = (),
    device: Optional[str] = None,
    required_parts: Sequence[str] = ("backbone",),
) -> FrozenTeacher:
    """Builds the teacher from its own config file, loads ``weights`` strictly and freezes it.
    Usable in LazyConfig: ``teacher=L(load_teacher)(config=..., weights=...)``; see
    :class:`FrozenTeacher` for ``required_parts``."""
    path = resolve_teacher_config(config)
    logger.info(f"Teacher config: {path} (MODEL.DISTILL.TEACHER.CONFIG '{config}')")
    model, input_format = build_teacher_model(path, opts, device)
    return FrozenTeacher(
        model,
        weights=weights,
        input_format=input_format,
        required_parts=required_parts,
        config=path,
    )


def _channel_reorder(student_format: str, teacher_format: str) -> bool:
    formats = {student_format, teacher_format}
    if student_format == teacher_format:
        return False
    if formats == {"RGB", "BGR"}:
        return True
    raise ValueError(
        f"Cannot convert student INPUT.FORMAT={student_format} to teacher format "
        f"{teacher_format}: only RGB<->BGR reordering is supported. Train both on the same format."
    )
