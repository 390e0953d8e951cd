"""What ``tools/check_distill.py`` and ``tools/report_distill.py`` read from a loaded config
(:func:`pkd.run_config.load_config`), for both config kinds: the distiller it builds and its data
(test images through the student's test-time mapper, training batches, the teacher's own
test-time mapper)."""
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.config import instantiate
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.registry import locate

from .. import run_config
from ..meta_arch import DistillMetaArch
from ..run_config import is_lazy
from ..teacher import load_teacher_config

__all__ = ["build_distiller", "test_dataset", "train_batches", "teacher_test_mapper"]

logger = logging.getLogger(__name__)

Mapper = Callable[[Dict], Dict]


def _target(node):
    target = node.get("_target_") if hasattr(node, "get") else None
    return locate(target) if isinstance(target, str) else target


def build_distiller(cfg) -> DistillMetaArch:
    """The DistillMetaArch of a distillation config (teacher loaded), in eval mode, on the
    config's device."""
    if is_lazy(cfg):
        if _target(cfg.model) is not DistillMetaArch:
            raise ValueError(
                f"model._target_ is {cfg.model.get('_target_')}: give a distillation config "
                "(a DistillMetaArch model)."
            )
        model = instantiate(cfg.model).to(cfg.train.device)
    else:
        if cfg.MODEL.META_ARCHITECTURE != "DistillMetaArch":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}: give a distillation "
                "config (MODEL.META_ARCHITECTURE DistillMetaArch)."
            )
        model = build_model(cfg)
    return model.eval()


def test_dataset(cfg) -> Tuple[str, Mapper]:
    """(the first test set's name, the student's test-time mapper)."""
    name = run_config.test_dataset(cfg)
    if name is None:
        raise ValueError("The config names no test set: name one to check the teacher on.")
    return name, run_config.test_mapper(cfg)


def train_batches(cfg, count: int) -> List[List[Dict]]:
    """The first ``count`` batches of the config's own training loader (its sampler,
    augmentation and batch size; no worker processes)."""
    if is_lazy(cfg):
        loader_cfg = cfg.dataloader.train
        previous = loader_cfg.num_workers
        loader_cfg.num_workers = 0
        try:
            loader = instantiate(loader_cfg)
        finally:
            loader_cfg.num_workers = previous
    else:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        loader = build_detection_train_loader(cfg)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def teacher_test_mapper(cfg) -> Tuple[Optional[Mapper], str]:
    """The teacher's own test-time mapper (its INPUT.FORMAT and test resize), from its own config.

    Returns:
        (mapper, description); mapper is None (with the reason) when the teacher's config has no
        data path (a LazyConfig without ``dataloader.test``, or a teacher built otherwise).
    """
    if is_lazy(cfg):
        node = cfg.model.get("teacher")
        if node is None or "config" not in node:
            return None, "the LazyConfig teacher is not built by pkd.teacher.load_teacher"
        config, opts = node.config, list(node.get("opts", ()) or ())
    else:
        config, opts = cfg.MODEL.DISTILL.TEACHER.CONFIG, list(cfg.MODEL.DISTILL.TEACHER.OPTS)
    teacher_cfg, kind = load_teacher_config(config, opts)
    shown = _shown_path(config)
    if kind == "yacs":
        return DatasetMapper(teacher_cfg, is_train=False), f"{shown} (yacs)"
    try:
        return instantiate(teacher_cfg.dataloader.test.mapper), f"{shown} (LazyConfig)"
    except (AttributeError, KeyError):
        return None, f"the teacher's LazyConfig {shown} has no dataloader.test.mapper"


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies under it."""
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative
