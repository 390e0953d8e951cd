"""Training and evaluation entry points for yacs (``.yaml``) and LazyConfig (``.py``) configs.

``tools/train_net.py`` is a thin wrapper around :func:`main`; everything a test needs lives here.
"""
import json
import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict

import torch
from torch import nn
from torch.utils.data import IterableDataset

from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine.train_loop import TrainerBase
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.data.build import _train_loader_from_config  # the sampler cfg chooses
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from .analysis.teacher_check import build_teacher_check_hook
from .checkpoint import DistillCheckpointer, ResumableSampler, build_checkpointer
from .config import get_distill_cfg
from .cpu_memory import retain_freed_cpu_memory
from .data import register_demo_datasets
from .meta_arch import DistillMetaArch, student_config
from .solver import build_optimizer

__all__ = [
    "Trainer",
    "setup",
    "main",
    "build_resumable_train_loader",
    "build_resumable_lazy_train_loader",
    "build_student_for_eval",
    "ddp_kwargs",
    "lazy_train",
    "lazy_test",
    "is_lazy_config",
]

logger = logging.getLogger("detectron2")


def is_lazy_config(path: str) -> bool:
    return path.endswith(".py")


def ddp_kwargs(device: str, **kwargs) -> Dict:
    """DDP arguments that also work on CPU (gloo): no ``device_ids`` there."""
    if torch.device(device).type == "cpu":
        kwargs["device_ids"] = None
    return kwargs


def build_resumable_train_loader(cfg):
    """Detectron2's train loader for a yacs cfg, with its sampler wrapped in a
    :class:`ResumableSampler`.

    Returns:
        (loader, sampler); sampler is None for an IterableDataset (nothing to skip).
    """
    kwargs = _train_loader_from_config(cfg)
    sampler = kwargs["sampler"] = _resumable(kwargs["sampler"])
    return build_detection_train_loader(**kwargs), sampler


def build_resumable_lazy_train_loader(train_cfg):
    """Same for a LazyConfig ``dataloader.train`` node calling ``build_detection_train_loader``
    (or any loader function with ``dataset`` and ``sampler`` arguments)."""
    target = train_cfg._target_
    if isinstance(target, str):
        target = locate(target)
    kwargs = {k: instantiate(v) for k, v in train_cfg.items() if k != "_target_"}
    sampler = kwargs.get("sampler")
    if sampler is None and not isinstance(kwargs["dataset"], IterableDataset):
        sampler = TrainingSampler(len(kwargs["dataset"]))
    kwargs["sampler"] = sampler = _resumable(sampler)
    return target(**kwargs), sampler


def _resumable(sampler):
    return ResumableSampler(sampler) if sampler is not None else None


def _start_sampler_at(sampler, iteration: int, total_batch_size: int) -> None:
    if sampler is not None:
        sampler.start_at(iteration, total_batch_size // comm.get_world_size())


class Trainer(DefaultTrainer):
    """DefaultTrainer for distillation: student-only checkpoints (pkd.checkpoint), an exact
    ``--resume`` (data order, RNG, normalizer EMA), DDP that also runs on CPU (gloo), and COCO
    evaluation."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader, self.train_sampler = build_resumable_train_loader(cfg)
        model = create_ddp_model(model, **ddp_kwargs(cfg.MODEL.DEVICE, broadcast_buffers=False))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        return [build_teacher_check_hook(self.cfg), *super().build_hooks()]

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        _start_sampler_at(self.train_sampler, self.start_iter, self.cfg.SOLVER.IMS_PER_BATCH)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def build_student_for_eval(cfg) -> nn.Module:
    """The model ``--eval-only`` evaluates: the student alone (the teacher is neither built nor
    loaded). ``cfg`` is a yacs CfgNode or a LazyConfig."""
    if not isinstance(cfg, CfgNode):  # LazyConfig
        model_cfg = cfg.model
        target = model_cfg._target_
        if isinstance(target, str):
            target = locate(target)
        if target is DistillMetaArch:
            model_cfg = model_cfg.student
        model = instantiate(model_cfg)
        return model.to(cfg.train.device)
    if cfg.MODEL.META_ARCHITECTURE == "DistillMetaArch":
        cfg = student_config(cfg)
    return build_model(cfg)


def _register_builtin_datasets(names) -> None:
    from .data import DEMO_TRAIN, DEMO_VAL

    if any(n in (DEMO_TRAIN, DEMO_VAL) for n in names):
        register_demo_datasets()


def setup(args):
    """Loads the config (yacs or LazyConfig), applies the trailing overrides and runs
    Detectron2's ``default_setup`` (logging, output dir, seed)."""
    if is_lazy_config(args.config_file):
        cfg = LazyConfig.load(args.config_file)
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
        names = _lazy_dataset_names(cfg)
    else:
        cfg = get_distill_cfg()
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        cfg.freeze()
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    default_setup(cfg, args)
    # As Detectron2's projects do (e.g. PointRend): show this package's own log lines too.
    setup_logger(_output_dir(cfg), distributed_rank=comm.get_rank(), name="pkd")
    _register_builtin_datasets(names)
    return cfg


def _output_dir(cfg) -> str:
    return cfg.OUTPUT_DIR if isinstance(cfg, CfgNode) else cfg.train.output_dir


def _device(cfg) -> torch.device:
    return torch.device(cfg.MODEL.DEVICE if isinstance(cfg, CfgNode) else cfg.train.device)


def _lazy_dataset_names(cfg):
    names = []
    for split in ("train", "test"):
        try:
            value = cfg.dataloader[split].dataset.names
        except (AttributeError, KeyError):
            continue
        names += [value] if isinstance(value, str) else list(value)
    return names


# ----------------------------------------------------------------------------------------------
# LazyConfig training loop (Detectron2's tools/lazyconfig_train_net.py, with our checkpointer and
# CPU-capable DDP).


def lazy_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def lazy_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader, train_sampler = build_resumable_lazy_train_loader(cfg.dataloader.train)
    model = create_ddp_model(model, **ddp_kwargs(cfg.train.device, **cfg.train.ddp))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = build_checkpointer(model, cfg.train.output_dir, trainer=trainer)
    last_results = {}

    def test_and_keep_results():
        last_results.update(lazy_test(cfg, model))
        return last_results

    trainer.register_hooks(
        [
            build_teacher_check_hook(cfg),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, test_and_keep_results),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    _start_sampler_at(train_sampler, start_iter, cfg.dataloader.train.total_batch_size)
    trainer.train(start_iter, cfg.train.max_iter)  # evaluates at the end (EvalHook)
    return last_results


RESULTS_FILE = "eval_results.json"


def main(args) -> Dict:
    """Train or evaluate, for either config kind. Returns the (last) evaluation results, also
    written to ``<output_dir>/eval_results.json``."""
    cfg = setup(args)
    lazy = is_lazy_config(args.config_file)
    output_dir = _output_dir(cfg)
    if _device(cfg).type == "cpu":
        retain_freed_cpu_memory()
    if args.eval_only:
        model = build_student_for_eval(cfg)
        weights = cfg.train.init_checkpoint if lazy else cfg.MODEL.WEIGHTS
        DistillCheckpointer(model, save_dir=output_dir).resume_or_load(
            weights, resume=args.resume
        )
        results = lazy_test(cfg, model) if lazy else Trainer.test(cfg, model)
    elif lazy:
        results = lazy_train(args, cfg)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()  # evaluates at the end (EvalHook)
        results = getattr(trainer, "_last_eval_results", OrderedDict())
    if results and comm.is_main_process():
        with open(os.path.join(output_dir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
    return results
