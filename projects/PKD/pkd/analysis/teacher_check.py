"""Does the teacher see? Its COCO box AP on a few images, through the distiller's path
(:meth:`pkd.teacher.FrozenTeacher.detect`), and the message that names the likely cause when it
detects (next to) nothing. ``tools/check_distill.py`` runs it on the test set; the trainers run
the cheap part on a few training images before the first iteration (:class:`TeacherCheckHook`)."""
import contextlib
import io
import logging
import math
import random
import tempfile
import uuid
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import SequentialSampler

from detectron2.config import CfgNode, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import build_detection_test_loader
from detectron2.engine import HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import GeneralizedRCNN
from detectron2.utils.registry import locate

from ..meta_arch import DistillMetaArch
from ..teacher import RANDOM_WEIGHTS, FrozenTeacher

__all__ = [
    "MIN_TEACHER_AP",
    "BlindTeacherError",
    "TeacherCheckHook",
    "box_ap",
    "build_teacher_check_hook",
    "blind_teacher_message",
    "first_annotated",
    "other_format",
    "teacher_num_classes",
]

logger = logging.getLogger(__name__)

# A teacher below this COCO box AP (0-100) on the checked images "detects nothing".
MIN_TEACHER_AP = 1.0
# Training images the trainer checks the teacher on before the first iteration.
HOOK_IMAGES = 8

Detector = Callable[[List[Dict]], List[Dict]]


class BlindTeacherError(RuntimeError):
    """The teacher detects (next to) nothing on images it should know."""


def other_format(input_format: str) -> str:
    """The other channel order: "BGR" <-> "RGB"."""
    return {"BGR": "RGB", "RGB": "BGR"}[input_format]


def teacher_num_classes(model: nn.Module) -> Optional[int]:
    """How many classes a Detectron2 detector predicts, or None if it cannot tell."""
    if isinstance(model, GeneralizedRCNN):
        return getattr(model.roi_heads, "num_classes", None)
    return getattr(model, "num_classes", None)


def first_annotated(dicts: Sequence[Dict], count: int) -> List[Dict]:
    """The first ``count`` dataset dicts with at least one (non-crowd) box."""
    chosen = []
    for d in dicts:
        if any(not a.get("iscrowd", 0) for a in d.get("annotations", ())):
            chosen.append(d)
            if len(chosen) == count:
                break
    return chosen


@contextlib.contextmanager
def _global_rng_untouched() -> Iterator[None]:
    """Restores Python's, numpy's and torch's global RNG states on exit: scoring the teacher
    draws from them (the DataLoader's base seed, the test-time resize's size choice), and a run
    must train the same with the check as without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _registered_subset(dataset_name: str, dicts: List[Dict]) -> Iterator[str]:
    """Registers ``dicts`` under a temporary name with ``dataset_name``'s metadata (classes and
    category ids), so that COCOEvaluator scores exactly these images."""
    name = f"{dataset_name}__subset_{uuid.uuid4().hex[:8]}"
    metadata = {
        k: v
        for k, v in MetadataCatalog.get(dataset_name).as_dict().items()
        if k not in ("name", "json_file")
    }
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(**metadata)
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def box_ap(
    detect: Detector, dicts: List[Dict], mapper: Callable[[Dict], Dict], dataset_name: str
) -> Dict[str, Optional[float]]:
    """COCO box AP (Detectron2's COCOEvaluator) of ``detect`` on exactly the images ``dicts``.

    Args:
        detect: a batch of Detectron2 inputs -> per image ``{"instances": Instances}``.
        dicts: dataset dicts of ``dataset_name`` (with their annotations).
        mapper: turns a dict into a model input (the data path under test).

    Returns:
        {"AP", "AP50", "AP75", ...} in 0-100; a metric COCO cannot compute (no detections at
        all, no box of a class) is None, and "AP" is 0.0 when nothing was detected. The global
        random number generators are left as they were.
    """
    with _global_rng_untouched():
        return _box_ap(detect, dicts, mapper, dataset_name)


def _box_ap(detect: Detector, dicts: List[Dict], mapper, dataset_name: str) -> Dict:
    loader = build_detection_test_loader(
        dataset=dicts, mapper=mapper, sampler=SequentialSampler(dicts), num_workers=0
    )
    with _registered_subset(dataset_name, dicts) as name, tempfile.TemporaryDirectory() as tmp:
        evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=tmp)
        evaluator.reset()
        with torch.no_grad():
            for batch in loader:
                evaluator.process(batch, detect(batch))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            bbox = evaluator.evaluate().get("bbox", {})
    results = {k: None if v is None or math.isnan(v) else float(v) for k, v in bbox.items()}
    if results.get("AP") is None:
        results["AP"] = 0.0
    return results


def blind_teacher_message(
    teacher: FrozenTeacher,
    ap: float,
    where: str,
    dataset_name: str,
    swapped_ap: Optional[float] = None,
    student_format: Optional[str] = None,
) -> str:
    """Explains a teacher that detects (next to) nothing, most likely cause first.

    Args:
        ap: its box AP through the distiller's path on ``where`` (e.g. "8 training images").
        swapped_ap: its AP on the same images with the other channel order, if measured.
        student_format: the student's INPUT.FORMAT (the images' channel order).
    """
    model = teacher.model
    lines = [
        f"The teacher detects (next to) nothing: box AP {ap:.1f} on {where} of {dataset_name} "
        f"(a usable teacher has AP >= {MIN_TEACHER_AP:.0f}). Likely causes:"
    ]
    if teacher.weights == RANDOM_WEIGHTS:
        lines.append(
            "- weights: MODEL.DISTILL.TEACHER.WEIGHTS is 'random' (untrained; for tests only)."
        )
    if swapped_ap is not None and swapped_ap >= max(MIN_TEACHER_AP, ap + 1.0):
        lines.append(
            f"- channel order: fed {other_format(teacher.input_format)} instead of "
            f"{teacher.input_format}, the teacher reaches AP {swapped_ap:.1f}: its weights were "
            f"trained with INPUT.FORMAT {other_format(teacher.input_format)}. Fix the teacher "
            "config's INPUT.FORMAT (or MODEL.DISTILL.TEACHER.OPTS)."
        )
    num_classes = teacher_num_classes(model)
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if num_classes is not None and classes is not None and num_classes != len(classes):
        lines.append(
            f"- classes: the teacher predicts {num_classes} classes, {dataset_name} has "
            f"{len(classes)}: it was trained on other data (its class i must be class i here)."
        )
    if teacher.weights != RANDOM_WEIGHTS:
        lines.append(
            f"- weights: is MODEL.DISTILL.TEACHER.WEIGHTS ('{teacher.weights}') the checkpoint "
            "trained with MODEL.DISTILL.TEACHER.CONFIG (not an init, or another model's weights "
            "that happen to load)?"
        )
    lines += [
        f"- mean/std: the teacher normalises with PIXEL_MEAN {_values(model.pixel_mean)} and "
        f"PIXEL_STD {_values(model.pixel_std)}; they must be the ones it was trained with.",
        f"- classes: class i of the teacher must be class i of {dataset_name} "
        f"({list(classes) if classes is not None else 'no thing_classes'}).",
    ]
    if student_format is not None:
        lines.append(
            f"- channel order: the student's images are {student_format}, reordered to the "
            f"teacher's {teacher.input_format}."
        )
    return "\n".join(lines)


def _values(t: torch.Tensor) -> List[float]:
    return [round(float(v), 3) for v in t.flatten()]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class TeacherCheckHook(HookBase):
    """Before the first iteration: the teacher's box AP on a few training images through the
    distiller's path; raises :class:`BlindTeacherError` (training does not start) when it is
    below MIN_TEACHER_AP. Skipped for a plain (non-distillation) model, a ``random`` teacher,
    ``check_teacher=False`` (yacs ``MODEL.DISTILL.CHECK_TEACHER``), and a run resumed after
    distillation stopped. Every process runs it on the same images, so all stop together."""

    def __init__(
        self,
        dataset_name: str,
        dataset_dicts: Callable[[], List[Dict]],
        mapper: Callable[[Dict], Dict],
        num_images: int = HOOK_IMAGES,
    ):
        """
        Args:
            dataset_name: the training set (its metadata names the classes).
            dataset_dicts: returns its dicts; only called when the check runs.
            mapper: the student's test-time mapper (no augmentation).
        """
        self.dataset_name = dataset_name
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.num_images = num_images

    def before_train(self):
        model = _unwrap(self.trainer.model)
        if not isinstance(model, DistillMetaArch):
            return
        teacher = model.teacher
        if not model.check_teacher or teacher.weights == RANDOM_WEIGHTS:
            logger.info("Teacher check skipped (turned off, or a 'random' teacher).")
            return
        if 0 < model.stop_iter <= self.trainer.start_iter:
            return  # resumed after distillation stopped: the teacher no longer runs
        dicts = first_annotated(self.dataset_dicts(), self.num_images)
        if not dicts:
            logger.warning(f"Teacher check skipped: {self.dataset_name} has no annotated image.")
            return
        student_format = model.student_input_format
        ap = box_ap(
            lambda batch: teacher.detect(batch, student_format), dicts, self.mapper,
            self.dataset_name,
        )["AP"]
        where = f"{len(dicts)} training images"
        if ap >= MIN_TEACHER_AP:
            logger.info(f"Teacher check: box AP {ap:.1f} on {where} of {self.dataset_name}.")
            return
        swapped = other_format(student_format)
        swapped_ap = box_ap(
            lambda batch: teacher.detect(batch, swapped), dicts, self.mapper, self.dataset_name
        )["AP"]
        raise BlindTeacherError(
            blind_teacher_message(
                teacher, ap, where, self.dataset_name, swapped_ap, student_format
            )
            + "\nTo train anyway, set MODEL.DISTILL.CHECK_TEACHER False (LazyConfig: "
            "model.check_teacher=False)."
        )


def build_teacher_check_hook(cfg) -> Optional[TeacherCheckHook]:
    """The hook for a yacs CfgNode or a LazyConfig of a distillation run (None for any other
    model): its first training set, read through the student's test-time mapper (yacs
    ``DatasetMapper(cfg, is_train=False)``; LazyConfig ``dataloader.test.mapper``)."""
    if isinstance(cfg, CfgNode):
        if cfg.MODEL.META_ARCHITECTURE != "DistillMetaArch":
            return None
        name = cfg.DATASETS.TRAIN[0]
        mapper = DatasetMapper(cfg, is_train=False)
    else:
        target = cfg.model.get("_target_")
        if (locate(target) if isinstance(target, str) else target) is not DistillMetaArch:
            return None
        names = cfg.dataloader.train.dataset.names
        name = names if isinstance(names, str) else names[0]
        mapper = instantiate(cfg.dataloader.test.mapper)
    return TeacherCheckHook(name, lambda: DatasetCatalog.get(name), mapper)
