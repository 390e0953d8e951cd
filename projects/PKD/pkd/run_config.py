"""Reading a config of either kind: a yacs ``.yaml`` (with every key of the project), a
LazyConfig ``.py``, or the ``config.yaml`` Detectron2's ``default_setup`` saved into a run's output
directory; and what every tool asks of one (output directory, device, seed, test set and its
test-time mapper). The built-in demo datasets a config names are registered when it is loaded."""
import os
import re
from typing import List, Optional, Sequence

import torch

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper

from .config import get_distill_cfg
from .data import DEMO_TEST, DEMO_TRAIN, DEMO_VAL, register_demo_datasets

__all__ = [
    "is_lazy_config",
    "is_lazy",
    "load_config",
    "dataset_names",
    "register_builtin_datasets",
    "output_dir",
    "device",
    "seed",
    "test_dataset",
    "test_mapper",
]


def is_lazy_config(path: str) -> bool:
    """Whether a config file is a LazyConfig ``.py`` (else a yacs ``.yaml``)."""
    return path.endswith(".py")


def _is_saved_lazy_config(path: str) -> bool:
    """A ``config.yaml`` written by ``LazyConfig.save`` (lower-case ``model``/``train``
    sections) rather than a yacs dump (``MODEL``, ``SOLVER``, ...)."""
    with open(path) as f:
        top = {m.group(1) for m in re.finditer(r"^(\w+):", f.read(), flags=re.MULTILINE)}
    return "model" in top and "MODEL" not in top


def is_lazy(cfg) -> bool:
    """Whether a loaded config is a LazyConfig (else a yacs CfgNode)."""
    return not isinstance(cfg, CfgNode)


def load_config(path: str, opts: Sequence[str] = ()):
    """Loads a config file and applies ``opts`` (``KEY VALUE`` for yacs, ``key=value`` for
    LazyConfig); registers the built-in datasets it names.

    Returns:
        a yacs CfgNode (not frozen) or a LazyConfig.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    if is_lazy_config(path) or _is_saved_lazy_config(path):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(opts))
    else:
        cfg = get_distill_cfg()
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts))
    register_builtin_datasets(dataset_names(cfg))
    return cfg


def dataset_names(cfg) -> List[str]:
    """The training and test datasets a config names."""
    if not is_lazy(cfg):
        return list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    names = []
    for split in ("train", "test"):
        try:
            value = cfg.dataloader[split].dataset.names
        except (AttributeError, KeyError):
            continue
        names += [value] if isinstance(value, str) else list(value)
    return names


def register_builtin_datasets(names: Sequence[str]) -> None:
    """Builds (once) and registers the demo dataset when one of ``names`` is a split of it that
    is not registered yet (a registration made earlier, e.g. under another root, is kept)."""
    if any(n in (DEMO_TRAIN, DEMO_VAL, DEMO_TEST) and n not in DatasetCatalog for n in names):
        register_demo_datasets()


def output_dir(cfg) -> str:
    return cfg.train.output_dir if is_lazy(cfg) else cfg.OUTPUT_DIR


def device(cfg) -> torch.device:
    return torch.device(cfg.train.device if is_lazy(cfg) else cfg.MODEL.DEVICE)


def seed(cfg) -> Optional[int]:
    """The config's seed (yacs ``SEED``, LazyConfig ``train.seed``); None when negative (random),
    as Detectron2's ``default_setup`` reads it."""
    value = cfg.train.get("seed", -1) if is_lazy(cfg) else cfg.SEED
    return None if value is None or value < 0 else int(value)


def init_weights(cfg) -> str:
    """The checkpoint training initialises the student from (yacs ``MODEL.WEIGHTS``, LazyConfig
    ``train.init_checkpoint``); "" for none."""
    return (cfg.train.get("init_checkpoint", "") if is_lazy(cfg) else cfg.MODEL.WEIGHTS) or ""


def test_dataset(cfg) -> Optional[str]:
    """The config's first test set, or None."""
    if not is_lazy(cfg):
        return cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    try:
        names = cfg.dataloader.test.dataset.names
    except (AttributeError, KeyError):
        return None
    return names if isinstance(names, str) else (list(names) or [None])[0]


def test_mapper(cfg):
    """The config's test-time mapper: reads an image file in its input format and resizes it."""
    if is_lazy(cfg):
        return instantiate(cfg.dataloader.test.mapper)
    return DatasetMapper(cfg, is_train=False)
