"""One way to run a supported student through its own training forward and keep what the
distillation losses need (its padded input batch, FPN dict and, for dense heads, the head's
material), and the one way to turn a dense head's outputs into :class:`DenseHeadOutputs`."""
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances

from .losses.base import DenseHeadOutputs

__all__ = [
    "StudentOutputs",
    "check_student",
    "check_dense_student",
    "run_student",
    "capture_tower_taps",
    "dense_head_outputs",
    "matched_gt_indices",
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


def _first_block_end(tower: nn.Module, name: str) -> nn.Module:
    """The ReLU that ends the first conv (+ norm) + ReLU block of a head tower."""
    for module in tower.children():
        if isinstance(module, nn.ReLU):
            return module
    raise ValueError(
        f"The head's {name} has no conv + norm + ReLU block (NUM_CONVS = 0?): PGD imitates the "
        "output of the first block of each head tower. Use a head with at least one tower conv."
    )


@contextmanager
def capture_tower_taps(head: nn.Module) -> Iterator[Dict[str, List[Tensor]]]:
    """While active, collects the output of the first block of a RetinaNet-style head's
    ``cls_subnet`` and ``bbox_subnet``, once per head level, in the order the head runs them.

    Yields:
        {"cls": [(N, C, Hl, Wl), ...], "reg": [...]}, filled as the head runs.
    """
    taps: Dict[str, List[Tensor]] = {"cls": [], "reg": []}
    hooks = [
        _first_block_end(tower, name).register_forward_hook(
            lambda _m, _a, output, key=key: taps[key].append(output)
        )
        for key, name, tower in (
            ("cls", "cls_subnet", head.cls_subnet),
            ("reg", "bbox_subnet", head.bbox_subnet),
        )
    ]
    try:
        yield taps
    finally:
        for hook in hooks:
            hook.remove()


def dense_head_outputs(
    model: DenseDetector,
    head_outputs: Sequence[List[Tensor]],
    taps: Dict[str, List[Tensor]],
    anchors: List[Boxes],
    decode_boxes: bool = False,
) -> DenseHeadOutputs:
    """Packs what a dense detector's head produced (``model.head`` outputs, tower taps and the
    model's anchors of each level) into :class:`DenseHeadOutputs`; with ``decode_boxes``, also
    the boxes the model's own ``box2box_transform`` decodes from its deltas."""
    logits, deltas = head_outputs[0], head_outputs[1]
    outputs = DenseHeadOutputs(
        levels=list(model.head_in_features),
        cls_taps=list(taps["cls"]),
        reg_taps=list(taps["reg"]),
        logits=list(logits),
        flat_logits=torch.cat([permute_to_N_HWA_K(x, model.num_classes) for x in logits], dim=1),
        flat_deltas=torch.cat([permute_to_N_HWA_K(x, 4) for x in deltas], dim=1),
        anchors=Boxes.cat(anchors).tensor,
        anchors_per_location=list(model.anchor_generator.num_anchors),
    )
    if decode_boxes:
        outputs.boxes = torch.stack(
            [
                model.box2box_transform.apply_deltas(d.float(), outputs.anchors)
                for d in outputs.flat_deltas
            ]
        )
    return outputs


def matched_gt_indices(
    gt_labels: Tensor, matched_boxes: Tensor, instances: Instances, num_classes: int
) -> Tensor:
    """Recovers which GT each positive anchor was assigned to by a Detectron2 ``label_anchors``
    (which returns the matched box, not its index).

    Args:
        gt_labels: (R,) labels from ``label_anchors``: class, ``num_classes`` (background) or -1.
        matched_boxes: (R, 4) the matched GT box of each anchor.
        instances: the image's GT (``gt_boxes``, ``gt_classes``).

    Returns:
        (R,) long: index of the matched GT for positive anchors, -1 elsewhere. GTs with the same
        box and class are indistinguishable; the first is taken, as Detectron2's matchers do.
    """
    index = torch.full_like(gt_labels, -1)
    positive = (gt_labels >= 0) & (gt_labels < num_classes)
    if len(instances) == 0 or not positive.any():
        return index
    same = (matched_boxes[positive, None, :] == instances.gt_boxes.tensor[None]).all(dim=2)
    same &= gt_labels[positive, None] == instances.gt_classes[None]
    index[positive] = same.float().argmax(dim=1)  # argmax returns the first maximum
    return index


@dataclass
class StudentOutputs:
    """What one training forward of the student produced.

    Attributes:
        losses: the student's own losses, as its forward returns them.
        images: (N, 3, H, W) padded, normalised input batch the backbone saw.
        features: the backbone's dict {level: (N, C, Hl, Wl)}.
        head: dense students only, when requested: the head's material.
        gt_labels, matched_gt: dense students only, when requested: the student's own label
            assignment of this step, per image (R,) (see :class:`pkd.losses.DensePredictions`).
    """

    losses: Dict[str, Tensor]
    images: Tensor
    features: Dict[str, Tensor]
    head: Optional[DenseHeadOutputs] = None
    gt_labels: Optional[List[Tensor]] = None
    matched_gt: Optional[List[Tensor]] = None


@contextmanager
def _capture_label_assignment(student: DenseDetector) -> Iterator[Dict[str, Tuple]]:
    """While active, keeps the arguments and result of the student's own ``label_anchors``
    call (its training forward makes exactly one), so the assignment is never computed twice."""
    captured: Dict[str, Tuple] = {}
    label_anchors = student.label_anchors

    def keep(anchors, gt_instances):
        captured["result"] = label_anchors(anchors, gt_instances)
        captured["anchors"] = anchors
        return captured["result"]

    student.label_anchors = keep  # an instance attribute shadows the method for this scope
    try:
        yield captured
    finally:
        del student.label_anchors


def run_student(
    student: nn.Module,
    batched_inputs: List[Dict],
    dense: bool = False,
    before_backbone: Optional[Callable[[Tensor], None]] = None,
) -> StudentOutputs:
    """Runs ``student(batched_inputs)`` unchanged (its own preprocessing, backbone, head or
    proposals+ROI heads, label assignment and loss code) and captures the intermediate tensors
    with hooks, so no Detectron2 code is forked and nothing is computed twice.

    Args:
        dense: also capture the dense head's material and the student's label assignment.
        before_backbone: called with the student's padded input batch (N, 3, H, W) right before
            its backbone runs, i.e. before the student builds the activations kept for backward.
    """
    captured = {}

    def call_before_backbone(_module, args):
        before_backbone(args[0])

    def keep_backbone(_module, args, output):
        captured["images"], captured["features"] = args[0], output

    def keep_head(_module, _args, output):
        captured["head"] = output

    with ExitStack() as stack:
        stack.callback(student.backbone.register_forward_hook(keep_backbone).remove)
        if before_backbone is not None:
            hook = student.backbone.register_forward_pre_hook(call_before_backbone)
            stack.callback(hook.remove)
        if dense:
            check_dense_student(student)
            stack.callback(student.head.register_forward_hook(keep_head).remove)
            taps = stack.enter_context(capture_tower_taps(student.head))
            assignment = stack.enter_context(_capture_label_assignment(student))
        losses = student(batched_inputs)
    outputs = StudentOutputs(
        losses=losses, images=captured["images"], features=captured["features"]
    )
    if dense:
        gt_instances = [x["instances"] for x in batched_inputs]
        outputs.head = dense_head_outputs(student, captured["head"], taps, assignment["anchors"])
        outputs.gt_labels, matched_boxes = assignment["result"]
        outputs.matched_gt = [
            matched_gt_indices(labels, boxes, inst.to(labels.device), student.num_classes)
            for labels, boxes, inst in zip(outputs.gt_labels, matched_boxes, gt_instances)
        ]
    return outputs
