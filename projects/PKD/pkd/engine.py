"""Training and evaluation entry points for yacs (``.yaml``) and LazyConfig (``.py``) configs.

``tools/train_net.py`` is a thin wrapper around :func:`main`; everything a test needs lives here.
"""
import contextlib
import json
import logging
import os
import random
import weakref
from collections import OrderedDict
from typing import Dict

import numpy as np
import torch
from torch import nn

import detectron2.engine.defaults
from detectron2.config import CfgNode, instantiate
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate

from .analysis.teacher_check import build_teacher_check_hook
from .checkpoint import DistillCheckpointer
from .cpu_memory import retain_freed_cpu_memory
from .meta_arch import DistillMetaArch, student_config
from .solver import build_optimizer
from .run_config import device, init_weights, is_lazy, load_config, output_dir
from .train_loader import build_resumable_lazy_train_loader, build_resumable_train_loader

__all__ = [
    "Trainer",
    "ResumeState",
    "build_checkpointer",
    "setup",
    "main",
    "build_student_for_eval",
    "ddp_kwargs",
    "lazy_train",
    "lazy_test",
]

logger = logging.getLogger("detectron2")


def ddp_kwargs(device: str, **kwargs) -> Dict:
    """DDP arguments that also work on CPU (gloo): no ``device_ids`` there."""
    if torch.device(device).type == "cpu":
        kwargs["device_ids"] = None
    return kwargs


class ResumeState:
    """Checkpointable with what Detectron2 does not save but an exact resume needs: the RNG
    states (data augmentation, R-CNN sampling) and the dense students' loss-normalizer EMA
    (a plain attribute of RetinaNet/FCOS, hence absent from their state_dict)."""

    _EMA_ATTRIBUTES = ("loss_normalizer",)

    def __init__(self, student: nn.Module):
        self.student = student

    def state_dict(self):
        np_state = np.random.get_state()
        state = {
            "python_random": random.getstate(),
            "numpy_random": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch_random": torch.get_rng_state(),
            "student_ema": {
                k: float(getattr(self.student, k))
                for k in self._EMA_ATTRIBUTES
                if hasattr(self.student, k)
            },
        }
        if torch.cuda.is_available():
            state["cuda_random"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state) -> None:
        for k, v in state.get("student_ema", {}).items():
            setattr(self.student, k, v)
        if comm.get_world_size() > 1:
            # Only the main process's RNG was saved; other ranks keep their own seeds.
            logger.info("Resume: RNG states are restored in single-process training only.")
            return
        random.setstate(_as_tuples(state["python_random"]))
        name, keys, *rest = state["numpy_random"]
        np.random.set_state((name, keys.numpy(), *rest))
        torch.set_rng_state(state["torch_random"])
        if "cuda_random" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_random"])


def _as_tuples(x):
    # random.setstate wants tuples; serialisation may have turned them into lists.
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def build_checkpointer(model: nn.Module, save_dir: str = "", **checkpointables) -> DistillCheckpointer:
    """The checkpointer training uses (the layout of :mod:`pkd.checkpoint`). For a
    DistillMetaArch (possibly in DDP) its ``"model"`` is the student; ``distill_losses`` and
    ``resume_state`` are added as checkpointables."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, DistillMetaArch):
        checkpointables["distill_losses"] = model.distill_losses
        model = model.student
    checkpointables["resume_state"] = ResumeState(model)
    return DistillCheckpointer(model, save_dir, **checkpointables)


@contextlib.contextmanager
def _ddp_kwargs_in_default_trainer(device: str):
    """DefaultTrainer.__init__ wraps the model with ``create_ddp_model(model,
    broadcast_buffers=False)``, which passes ``device_ids=[local_rank]``: torch refuses that for a
    CPU module. DefaultTrainer has no argument for it, so while its constructor runs, its module's
    ``create_ddp_model`` gets :func:`ddp_kwargs` of ``device``."""
    defaults = detectron2.engine.defaults
    original = defaults.create_ddp_model

    def cpu_capable_create_ddp_model(model, **kwargs):
        return original(model, **ddp_kwargs(device, **kwargs))

    defaults.create_ddp_model = cpu_capable_create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """DefaultTrainer for distillation: student-only checkpoints (:func:`build_checkpointer`), an
    exact ``--resume`` (data order, RNG, normalizer EMA), DDP that also runs on CPU (gloo), the
    whole-model gradient clipping of :mod:`pkd.solver`, and COCO evaluation."""

    def __init__(self, cfg):
        with _ddp_kwargs_in_default_trainer(cfg.MODEL.DEVICE):
            super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this right after making its checkpointer, which would save
        # the whole model, teacher included: the hooks save through ours instead.
        self.checkpointer = build_checkpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return [build_teacher_check_hook(self.cfg), *super().build_hooks()]

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        self.data_loader.start_at(self.start_iter)

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


def setup(args):
    """Loads the config (yacs or LazyConfig), applies the trailing overrides and runs
    Detectron2's ``default_setup`` (logging, output dir, seed)."""
    cfg = load_config(args.config_file, args.opts)
    if not is_lazy(cfg):
        cfg.freeze()
    default_setup(cfg, args)
    # As Detectron2's projects do (e.g. PointRend): show this package's own log lines too.
    setup_logger(output_dir(cfg), distributed_rank=comm.get_rank(), name="pkd")
    return cfg


# ----------------------------------------------------------------------------------------------
# LazyConfig training and evaluation. Detectron2 has no trainer class for LazyConfigs (its loop is
# the script tools/lazyconfig_train_net.py), so this composes its public engine pieces the same
# way; what is ours: the resumable loader, the student-only checkpointer, CPU-capable DDP and the
# returned results.


def lazy_test(cfg, model) -> Dict:
    """COCO evaluation of ``model`` on ``cfg.dataloader.test``; {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def _lazy_hooks(cfg, checkpointer, evaluate):
    main_process = comm.is_main_process()
    writers = default_writers(cfg.train.output_dir, cfg.train.max_iter) if main_process else None
    return [
        build_teacher_check_hook(cfg),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if main_process
        else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if main_process else None,
    ]


def lazy_train(args, cfg) -> Dict:
    """Trains a LazyConfig (``--resume`` continues exactly); returns the last evaluation results
    (the EvalHook evaluates at the end)."""
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = build_resumable_lazy_train_loader(cfg.dataloader.train)
    model = create_ddp_model(model, **ddp_kwargs(cfg.train.device, **cfg.train.ddp))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, train_loader, optimizer
    )
    checkpointer = build_checkpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def evaluate():
        results.update(lazy_test(cfg, model))
        return results

    trainer.register_hooks(_lazy_hooks(cfg, checkpointer, evaluate))
    checkpointer.resume_or_load(init_weights(cfg), resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    train_loader.start_at(start_iter)
    trainer.train(start_iter, cfg.train.max_iter)
    return results


RESULTS_FILE = "eval_results.json"


def main(args) -> Dict:
    """Train or evaluate, for either config kind. Returns the (last) evaluation results, also
    written to ``<output_dir>/eval_results.json``."""
    cfg = setup(args)
    lazy = is_lazy(cfg)
    out = output_dir(cfg)
    if device(cfg).type == "cpu":
        retain_freed_cpu_memory()
    if args.eval_only:
        model = build_student_for_eval(cfg)
        DistillCheckpointer(model, save_dir=out).resume_or_load(
            init_weights(cfg), resume=args.resume
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
        with open(os.path.join(out, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
    return results
