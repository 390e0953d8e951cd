"""One way to run a supported student through its own training forward and keep what the
distillation losses need (its padded input batch, FPN dict and, for dense heads, predictions)."""
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import Tensor, nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector

__all__ = [
    "StudentOutputs",
    "check_student",
    "check_dense_student",
    "run_student",
    "SUPPORTED_STUDENTS",
]

SUPPORTED_STUDENTS = (DenseDetector, GeneralizedRCNN)


def check_student(model: nn.Module) -> None:
    """Raises a TypeError naming the supported kinds if ``model`` is not one of them."""
    if not isinstance(model, SUPPORTED_STUDENTS):
        raise TypeError(
            f"Unsupported student {type(model).__name__}: DistillMetaArch distils RetinaNet, FCOS "
            "(any DenseDetector) and GeneralizedRCNN (Faster/Mask R-CNN) students. Set "
            "MODEL.DISTILL.STUDENT_ARCH to one of 'RetinaNet', 'FCOS', 'GeneralizedRCNN'."
        )


def check_dense_student(model: nn.Module) -> None:
    """Raises unless ``model`` has a dense head, as prediction-guided losses need."""
    if not isinstance(model, DenseDetector):
        raise TypeError(
            f"Prediction-guided losses (PGD, RM, PFI) need a dense student (RetinaNet, FCOS), got "
            f"{type(model).__name__}. Use a feature loss (PKD, MSE, FGD) with this student."
        )


@dataclass
class StudentOutputs:
    """What one training forward of the student produced.

    Attributes:
        losses: the student's own losses, as its forward returns them.
        images: (N, 3, H, W) padded, normalised input batch the backbone saw.
        features: the backbone's dict {level: (N, C, Hl, Wl)}.
        predictions: dense students only, when requested: the head's per-level outputs
            (e.g. [logits list, box deltas list] for RetinaNet).
    """

    losses: Dict[str, Tensor]
    images: Tensor
    features: Dict[str, Tensor]
    predictions: Optional[List[List[Tensor]]] = None


def run_student(
    student: nn.Module,
    batched_inputs: List[Dict],
    keep_predictions: bool = False,
    before_backbone: Optional[Callable[[Tensor], None]] = None,
) -> StudentOutputs:
    """Runs ``student(batched_inputs)`` unchanged (its own preprocessing, backbone, head or
    proposals+ROI heads, and loss code) and captures the intermediate tensors with forward hooks,
    so no Detectron2 code is forked and nothing is computed twice.

    Args:
        before_backbone: called with the student's padded input batch (N, 3, H, W) right before
            its backbone runs, i.e. before the student builds the activations kept for backward.
    """
    captured = {}

    def call_before_backbone(_module, args):
        before_backbone(args[0])

    def keep_backbone(_module, args, output):
        captured["images"], captured["features"] = args[0], output

    def keep_head(_module, _args, output):
        captured["predictions"] = output

    with ExitStack() as stack:
        stack.callback(student.backbone.register_forward_hook(keep_backbone).remove)
        if before_backbone is not None:
            hook = student.backbone.register_forward_pre_hook(call_before_backbone)
            stack.callback(hook.remove)
        if keep_predictions:
            check_dense_student(student)
            stack.callback(student.head.register_forward_hook(keep_head).remove)
        losses = student(batched_inputs)
    return StudentOutputs(
        losses=losses,
        images=captured["images"],
        features=captured["features"],
        predictions=captured.get("predictions"),
    )
