"""What ``tools/check_distill.py`` and ``tools/report_distill.py`` read from a config, for both
config kinds: the config itself (a yacs ``.yaml``, a LazyConfig ``.py``, or the ``config.yaml``
Detectron2's ``default_setup`` saved into a run's output directory), the distiller it builds, and
its data (test images through the student's test-time mapper, training batches, the teacher's own
test-time mapper)."""
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.registry import locate

from ..config import get_distill_cfg
from ..engine import _lazy_dataset_names, _register_builtin_datasets, is_lazy_config
from ..meta_arch import DistillMetaArch
from ..teacher import load_teacher_config

__all__ = [
    "load_config",
    "is_lazy",
    "output_dir",
    "build_distiller",
    "test_dataset",
    "train_batches",
    "teacher_test_mapper",
    "seed",
]

logger = logging.getLogger(__name__)

Mapper = Callable[[Dict], Dict]


def _is_saved_lazy_config(path: str) -> bool:
    """A ``config.yaml`` written by ``LazyConfig.save`` (lower-case ``model``/``train``
    sections) rather than a yacs dump (``MODEL``, ``SOLVER``, ...)."""
    with open(path) as f:
        top = {m.group(1) for m in re.finditer(r"^(\w+):", f.read(), flags=re.MULTILINE)}
    return "model" in top and "MODEL" not in top


def load_config(path: str, opts: Sequence[str] = ()):
    """Loads a yacs ``.yaml`` (with the project's keys), a LazyConfig ``.py`` or a saved LazyConfig
    ``config.yaml``, applies ``opts`` (``KEY VALUE`` / ``key=value``) and registers the built-in
    datasets it names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    if is_lazy_config(path) or _is_saved_lazy_config(path):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(opts))
        names = _lazy_dataset_names(cfg)
    else:
        cfg = get_distill_cfg()
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    _register_builtin_datasets(names)
    return cfg


def is_lazy(cfg) -> bool:
    return not isinstance(cfg, CfgNode)


def output_dir(cfg) -> str:
    return cfg.train.output_dir if is_lazy(cfg) else cfg.OUTPUT_DIR


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
    if is_lazy(cfg):
        names = cfg.dataloader.test.dataset.names
        name = names if isinstance(names, str) else names[0]
        return name, instantiate(cfg.dataloader.test.mapper)
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name a test set to check the teacher on.")
    return cfg.DATASETS.TEST[0], DatasetMapper(cfg, is_train=False)


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


def dataset_dicts(name: str) -> List[Dict]:
    return DatasetCatalog.get(name)


def device(cfg) -> torch.device:
    return torch.device(cfg.train.device if is_lazy(cfg) else cfg.MODEL.DEVICE)


def seed(cfg) -> Optional[int]:
    """The config's seed (yacs ``SEED``, LazyConfig ``train.seed``); None when negative (random),
    as Detectron2's ``default_setup`` reads it."""
    value = cfg.train.get("seed", -1) if is_lazy(cfg) else cfg.SEED
    return None if value is None or value < 0 else int(value)
