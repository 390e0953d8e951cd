"""DistillMetaArch: a stock Detectron2 student trained with its own losses plus distillation
losses against a frozen teacher's features."""
import logging
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .analysis.feature_vis import put_feature_images
from .kd_schedule import check_kd_schedule, kd_weight_scale
from .losses import (
    DISTILL_LOSS_REGISTRY,
    DensePredictions,
    DistillInputs,
    build_distill_losses,
    channel_pearson,
)
from .students import StudentOutputs, check_dense_student, check_student, run_student
from .teacher import FrozenTeacher, load_teacher

__all__ = ["DistillMetaArch", "resolve_feature_pairs", "student_config"]

logger = logging.getLogger(__name__)

FeaturePairs = List[Tuple[str, str]]

# kd/pcc_<level> is logged every this many iterations (Detectron2's default writer period).
PCC_PERIOD = 20


def _levels_by_stride(shapes: Mapping[str, ShapeSpec]) -> List[str]:
    return sorted(shapes, key=lambda k: shapes[k].stride)


def resolve_feature_pairs(
    student_shapes: Mapping[str, ShapeSpec],
    teacher_shapes: Mapping[str, ShapeSpec],
    feature_pairs: Optional[Sequence[Sequence[str]]] = None,
    num_levels: int = 4,
) -> FeaturePairs:
    """Returns validated ``[(student_level, teacher_level), ...]``.

    Args:
        student_shapes, teacher_shapes: ``backbone.output_shape()`` of each model.
        feature_pairs: explicit pairs; empty/None pairs the first ``num_levels`` levels of each
            model by index, finest first (RetinaNet p3..p6 with Mask R-CNN p2..p5).
    """
    if feature_pairs:
        pairs = []
        for pair in feature_pairs:
            if len(pair) != 2:
                raise ValueError(
                    f"MODEL.DISTILL.FEATURE_PAIRS item {pair} must be [student_level, teacher_level]."
                )
            pairs.append((str(pair[0]), str(pair[1])))
    else:
        student_levels = _levels_by_stride(student_shapes)[:num_levels]
        teacher_levels = _levels_by_stride(teacher_shapes)[:num_levels]
        if len(student_levels) < num_levels or len(teacher_levels) < num_levels:
            raise ValueError(
                f"MODEL.DISTILL.NUM_LEVELS={num_levels} but the student has levels "
                f"{_levels_by_stride(student_shapes)} and the teacher "
                f"{_levels_by_stride(teacher_shapes)}: lower NUM_LEVELS or list FEATURE_PAIRS."
            )
        pairs = list(zip(student_levels, teacher_levels))
    for s, t in pairs:
        if s not in student_shapes or t not in teacher_shapes:
            raise ValueError(
                f"Feature pair ({s}, {t}) names a level that does not exist: student levels are "
                f"{_levels_by_stride(student_shapes)}, teacher levels "
                f"{_levels_by_stride(teacher_shapes)}. Fix MODEL.DISTILL.FEATURE_PAIRS."
            )
    return pairs


def student_config(cfg):
    """The student's own config: the distillation config with META_ARCHITECTURE set to
    ``MODEL.DISTILL.STUDENT_ARCH`` (so every model-zoo ``_BASE_`` applies to the student)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.DISTILL.STUDENT_ARCH
    if cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
        raise ValueError("MODEL.DISTILL.STUDENT_ARCH cannot be DistillMetaArch.")
    return cfg


@META_ARCH_REGISTRY.register()
class DistillMetaArch(nn.Module):
    """Trains ``student`` (unmodified Detectron2 model) with its own losses plus distillation
    losses against ``teacher`` (frozen). Inference is exactly the student's forward.

    Training returns the student's loss dict plus one ``loss_<method>_<student_level>`` entry per
    distillation term, each multiplied by the schedule's factor (:func:`pkd.kd_schedule.
    kd_weight_scale`, logged as ``kd/weight_scale``), and logs ``kd/pcc_<student_level>`` (mean
    channel Pearson correlation) to the event storage every PCC_PERIOD iterations. While the factor
    is 0 the teacher does not run and the losses are the student's own.
    """

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: FrozenTeacher,
        losses: Mapping[str, nn.Module],
        feature_pairs: Optional[Sequence[Sequence[str]]] = None,
        num_levels: int = 4,
        student_input_format: str = "BGR",
        inherit: bool = False,
        warmup_iters: int = 0,
        stop_iter: int = 0,
        check_teacher: bool = True,
        vis_period: int = 0,
    ):
        """
        Args:
            student: a RetinaNet, FCOS (any DenseDetector) or GeneralizedRCNN.
            teacher: the frozen teacher.
            losses: {name: loss module}, see :data:`pkd.losses.DISTILL_LOSS_REGISTRY`.
            feature_pairs: [(student_level, teacher_level), ...]; None/empty: by index.
            num_levels: with pairing by index, how many leading levels.
            student_input_format: the student's INPUT.FORMAT ("BGR"/"RGB").
            inherit: initialise the student's FPN and head from the teacher where names and
                shapes match (FGD/PGD recipes); the student's init checkpoint (an ImageNet
                backbone) is loaded afterwards by the trainer.
            warmup_iters, stop_iter: the distillation weight schedule, see
                :func:`pkd.kd_schedule.kd_weight_scale` (0: no warm-up / never stops).
            check_teacher: the trainer refuses to start when the teacher detects nothing on a few
                training images (:class:`pkd.analysis.teacher_check.TeacherCheckHook`).
            vis_period: every this many iterations, teacher/student feature pictures go to the
                event storage (TensorBoard); 0: never. Detectron2's ``VIS_PERIOD``.
        """
        super().__init__()
        check_student(student)
        if not isinstance(teacher, FrozenTeacher):
            raise TypeError(f"teacher must be a pkd.teacher.FrozenTeacher, got {type(teacher)}.")
        if not losses:
            raise ValueError("No distillation loss configured (MODEL.DISTILL.LOSSES is empty).")
        self.student = student
        self.teacher = teacher
        self.distill_losses = nn.ModuleDict(dict(losses))
        self.student_input_format = student_input_format
        check_kd_schedule(warmup_iters, stop_iter)
        self.warmup_iters, self.stop_iter = int(warmup_iters), int(stop_iter)
        self.check_teacher = bool(check_teacher)
        self.vis_period = int(vis_period)
        student_shapes = student.backbone.output_shape()
        teacher_shapes = teacher.output_shape()
        self.feature_pairs = resolve_feature_pairs(
            student_shapes, teacher_shapes, feature_pairs, num_levels
        )
        self._check_channels(student_shapes, teacher_shapes)
        self.needs_predictions = any(
            getattr(loss, "needs_predictions", False) for loss in self.distill_losses.values()
        )
        if self.needs_predictions:
            self._check_dense_pair()
        if inherit:
            self._check_inherit_pairs()
            self.inherit_from_teacher()
        for s, t in self.feature_pairs:
            if student_shapes[s].stride != teacher_shapes[t].stride:
                logger.info(
                    f"Distilling student {s} (stride {student_shapes[s].stride}) from teacher {t} "
                    f"(stride {teacher_shapes[t].stride}): maps are resized to a common size."
                )

    def _check_dense_pair(self) -> None:
        """Prediction-guided losses compare the two dense heads location by location (and RM/PFI
        anchor by anchor): both must be dense, on one grid of head levels, with the same
        classes."""
        student, teacher = self.student, self.teacher.model
        check_dense_student(student)
        self.teacher.check_dense()
        strides = [
            [m.backbone.output_shape()[f].stride for f in m.head_in_features]
            for m in (student, teacher)
        ]
        if strides[0] != strides[1]:
            raise ValueError(
                f"Prediction-guided losses compare the heads location by location, but the "
                f"student's head levels {list(student.head_in_features)} have strides "
                f"{strides[0]} and the teacher's {list(teacher.head_in_features)} {strides[1]}. "
                "Use a dense teacher with the student's head levels."
            )
        if student.num_classes != teacher.num_classes:
            raise ValueError(
                f"Prediction-guided losses: the student predicts {student.num_classes} classes and "
                f"the teacher {teacher.num_classes}; both must be trained on the same classes."
            )
        anchor_losses = [
            n for n, l in self.distill_losses.items() if getattr(l, "compares_anchors", False)
        ]
        s_anchors = list(student.anchor_generator.num_anchors)
        t_anchors = list(teacher.anchor_generator.num_anchors)
        if anchor_losses and s_anchors != t_anchors:
            raise ValueError(
                f"{anchor_losses} compare predictions anchor by anchor, but the student has "
                f"{s_anchors} anchors per location (per head level) and the teacher {t_anchors}. "
                "Use a teacher with the student's MODEL.ANCHOR_GENERATOR sizes/aspect ratios."
            )

    def _check_inherit_pairs(self) -> None:
        crossed = [(s, t) for s, t in self.feature_pairs if s != t]
        if crossed:
            raise ValueError(
                f"MODEL.DISTILL.INHERIT copies the teacher's FPN and head into the student by "
                f"name, but feature pairs {crossed} distil a student level from a teacher level of "
                "another name: the inherited layers of a level would then be pulled toward a "
                "different teacher level. Inherit only with name-to-name pairs (a teacher of the "
                "student's family, e.g. RetinaNet X101 -> RetinaNet R50; set "
                "MODEL.DISTILL.FEATURE_PAIRS), or set MODEL.DISTILL.INHERIT False."
            )

    @torch.no_grad()
    def inherit_from_teacher(self) -> Tuple[List[str], List[str]]:
        """Copies the teacher's weights into the student's FPN and head (everything but
        ``backbone.bottom_up``) where names and shapes match.

        Returns:
            (copied, not_copied) student state names; both are logged.
        """
        teacher_state = self.teacher.model.state_dict()
        copied, not_copied = [], []
        for name, value in self.student.state_dict().items():
            if name.startswith("backbone.bottom_up."):
                continue
            source = teacher_state.get(name)
            if source is not None and source.shape == value.shape:
                value.copy_(source)
                copied.append(name)
            else:
                not_copied.append(name)
        logger.info(
            f"Inherited {len(copied)} student tensors from the teacher; not inherited "
            f"({len(not_copied)}, no teacher tensor of that name and shape): {not_copied}"
        )
        return copied, not_copied

    def _check_channels(self, student_shapes, teacher_shapes) -> None:
        strict = [
            n
            for n, l in self.distill_losses.items()
            if getattr(l, "uses_feature_pairs", True) and not getattr(l, "has_adapter", False)
        ]
        for s, t in self.feature_pairs:
            cs, ct = student_shapes[s].channels, teacher_shapes[t].channels
            if cs != ct and strict:
                raise ValueError(
                    f"Student level {s} has {cs} channels but teacher level {t} has {ct}, and "
                    f"loss(es) {strict} have no channel adapter. Pair levels with equal channels "
                    "(MODEL.DISTILL.FEATURE_PAIRS), match MODEL.FPN.OUT_CHANNELS, or use a loss "
                    "with an adapter (MSE, FGD)."
                )

    @classmethod
    def from_config(cls, cfg):
        distill = cfg.MODEL.DISTILL
        student = build_model(student_config(cfg))
        needs_head = any(
            getattr(DISTILL_LOSS_REGISTRY.get(name), "needs_predictions", False)
            for name in distill.LOSSES
            if name in DISTILL_LOSS_REGISTRY
        )
        teacher = load_teacher(
            distill.TEACHER.CONFIG,
            distill.TEACHER.WEIGHTS,
            distill.TEACHER.OPTS,
            device=cfg.MODEL.DEVICE,
            required_parts=("backbone", "head") if needs_head else ("backbone",),
        )
        student_shapes = student.backbone.output_shape()
        teacher_shapes = teacher.output_shape()
        pairs = resolve_feature_pairs(
            student_shapes, teacher_shapes, distill.FEATURE_PAIRS, distill.NUM_LEVELS
        )
        losses = build_distill_losses(
            cfg, feature_pairs=pairs, student_shapes=student_shapes, teacher_shapes=teacher_shapes
        )
        return {
            "student": student,
            "teacher": teacher,
            "losses": losses,
            "feature_pairs": pairs,
            "student_input_format": cfg.INPUT.FORMAT,
            "inherit": distill.INHERIT,
            "warmup_iters": distill.WARMUP_ITERS,
            "stop_iter": distill.STOP_ITER,
            "check_teacher": distill.CHECK_TEACHER,
            "vis_period": cfg.VIS_PERIOD,
        }

    @property
    def device(self) -> torch.device:
        return self.student.device

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2's list of dicts (``image`` (C, H, W), ``instances``, ...).

        Returns:
            training: dict of losses (student's + distillation); inference: the student's outputs.
        """
        if not self.training:
            return self.student(batched_inputs)
        storage = get_event_storage()
        scale = self.kd_weight_scale(storage.iter)
        storage.put_scalar("kd/weight_scale", scale, smoothing_hint=False)
        if scale == 0.0:
            return self._student_losses_only(batched_inputs)
        losses, inputs = self.distill_inputs(batched_inputs)
        losses = dict(losses)
        for terms in self.distillation_losses(inputs).values():
            clash = set(terms) & set(losses)
            if clash:
                raise RuntimeError(f"Distillation loss names {clash} collide with others.")
            losses.update({name: value * scale for name, value in terms.items()})
        self._log_correlation(inputs)
        if self.vis_period > 0 and storage.iter % self.vis_period == 0:
            self._put_feature_images(storage, batched_inputs, inputs)
        return losses

    def kd_weight_scale(self, iteration: int) -> float:
        """The factor of every distillation term at ``iteration`` (0: distillation off)."""
        return kd_weight_scale(iteration, self.warmup_iters, self.stop_iter)

    def _student_losses_only(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        losses = dict(self.student(batched_inputs))
        trainable = [p for p in self.distill_losses.parameters() if p.requires_grad]
        if trainable and comm.get_world_size() > 1:
            # DDP (find_unused_parameters=False) expects a gradient for every trainable
            # parameter in every step: a zero-valued term keeps the KD modules in the graph.
            losses["loss_kd_idle"] = sum(p.sum() for p in trainable) * 0.0
        return losses

    def distill_inputs(self, batched_inputs: List[Dict]) -> Tuple[Dict[str, torch.Tensor], DistillInputs]:
        """Runs the teacher and the student's own training forward once.

        Returns:
            (the student's own losses, the material every distillation loss reads).
        """
        teacher_features = {}

        def run_teacher(student_images):
            # Runs on the student's padded batch, before the student's backbone: the teacher's
            # no_grad intermediates are freed before the student builds the activations it keeps
            # for backward, which lowers peak memory.
            images = self.teacher.preprocess(
                batched_inputs, self.student_input_format, tuple(student_images.shape[-2:])
            )
            teacher_features.update(self.teacher.features(images))

        outputs = run_student(self.student, batched_inputs, self.needs_predictions, run_teacher)
        inputs = DistillInputs(
            levels=[s for s, _ in self.feature_pairs],
            student_features=[outputs.features[s] for s, _ in self.feature_pairs],
            teacher_features=[teacher_features[t] for _, t in self.feature_pairs],
            gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
            image_size=tuple(outputs.images.shape[-2:]),
        )
        if self.needs_predictions:
            inputs.predictions = self._dense_predictions(outputs, teacher_features)
        return outputs.losses, inputs

    def distillation_losses(self, inputs: DistillInputs) -> Dict[str, Dict[str, torch.Tensor]]:
        """Applies every configured loss to ``inputs``, in fp32 also under AMP.

        Returns:
            {loss name: {"loss_<method>_<level>": scalar, ...}}.
        """
        with torch.autocast(self.device.type, enabled=False):
            return {name: loss(inputs) for name, loss in self.distill_losses.items()}

    def _dense_predictions(
        self, outputs: StudentOutputs, teacher_features: Dict[str, torch.Tensor]
    ) -> DensePredictions:
        return DensePredictions(
            student=outputs.head,
            teacher=self.teacher.dense_head(teacher_features),
            gt_labels=outputs.gt_labels,
            matched_gt=outputs.matched_gt,
        )

    def _log_correlation(self, inputs: DistillInputs) -> None:
        storage = get_event_storage()
        # A diagnostic: every PCC_PERIOD iterations (the writers' period) is enough, and spares
        # the per-step cost (~1% of a step) and, on CUDA, the host syncs.
        if storage.iter % PCC_PERIOD:
            return
        for level, s, t in zip(inputs.levels, inputs.student_features, inputs.teacher_features):
            if s.shape[1] == t.shape[1]:
                storage.put_scalar(f"kd/pcc_{level}", channel_pearson(s, t))

    def _put_feature_images(
        self, storage, batched_inputs: List[Dict], inputs: DistillInputs
    ) -> None:
        student_shapes = self.student.backbone.output_shape()
        teacher_shapes = self.teacher.output_shape()
        put_feature_images(
            storage,
            batched_inputs,
            self.feature_pairs,
            inputs.student_features,
            inputs.teacher_features,
            [(student_shapes[s].stride, teacher_shapes[t].stride) for s, t in self.feature_pairs],
            self.student_input_format,
        )
