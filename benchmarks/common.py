"""What the timing benchmarks share: a DistillMetaArch built from a config with random weights
(no download), its optimizers and one batch; a training step timed as Detectron2's SimpleTrainer
runs it; interleaved timing rounds; and the record of the environment a timing depends on."""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, List, Optional, Tuple

import torch

import detectron2
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage

from pkd.config import get_distill_cfg
from pkd.cpu_memory import retain_freed_cpu_memory, retains_freed_cpu_memory
from pkd.losses import DistillInputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from pkd_testing import make_batch  # noqa: E402  (the test suite's batch maker)

# SGD runs with learning rate 0: torch still executes the whole update (weight decay, momentum,
# parameter add), so the step costs what a real one does, while the random-weight models stay
# the same every round. Random R50 with FrozenBN has no pretrained statistics: its gradient norm
# is ~1e7 and any positive rate turns the losses into NaN within a few steps.
BENCH_LR = 0.0
BOXES_PER_IMAGE = 3
# A kind whose slowest sample exceeds its fastest by this factor marks the run as noisy.
NOISE_SPREAD = 1.15

# One unit of measured work: returns {name: seconds}.
Runner = Callable[[], Dict[str, float]]


@dataclass(frozen=True)
class Preset:
    """A model pair and input size to benchmark."""

    student_config: str  # a file, or a Detectron2 model-zoo config name
    teacher_config: Optional[str]  # None: keep the one the student config names
    batch: int
    height: int
    width: int


def resolve_device(requested: str) -> str:
    """``cuda`` only when asked for and available; otherwise ``cpu`` (with a notice)."""
    if requested == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available: running on CPU.", file=sys.stderr)
        return "cpu"
    return requested


def build_cfg(preset: Preset, device: str):
    """The distillation config of ``preset``: random teacher weights, no downloads."""
    cfg = get_distill_cfg()
    path = preset.student_config
    cfg.merge_from_file(path if os.path.isfile(path) else model_zoo.get_config_file(path))
    cfg.MODEL.META_ARCHITECTURE = "DistillMetaArch"
    cfg.MODEL.DISTILL.STUDENT_ARCH = "RetinaNet"
    if preset.teacher_config is not None:
        cfg.MODEL.DISTILL.TEACHER.CONFIG = preset.teacher_config
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = "random"
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.SOLVER.BASE_LR = BENCH_LR
    cfg.freeze()
    return cfg


def sync(device: str) -> None:
    """Waits for queued GPU work, so that wall-clock intervals cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Workload:
    """The DistillMetaArch, its optimizers and the batch of one benchmark run; each is built on
    first use, so a memory probe builds only what its kind needs."""

    cfg: object
    batch_size: int
    height: int
    width: int
    seed: int
    last_losses: Dict[str, float] = field(default_factory=dict)
    # Minor page faults of each call of a kind, warm-up included (fresh zeroed pages the kernel
    # had to map: on CPU, what glibc's default allocator behaviour costs).
    page_faults: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.cfg.MODEL.DEVICE

    @cached_property
    def model(self):
        """The DistillMetaArch, in training mode."""
        seed_all_rng(self.seed)
        return build_model(self.cfg).train()

    @cached_property
    def student_optimizer(self):
        return build_optimizer(self.cfg, self.model.student)

    @cached_property
    def distill_optimizer(self):
        return build_optimizer(self.cfg, self.model)

    @cached_property
    def batch(self) -> List[dict]:
        """``batch_size`` images of height x width, uint8-valued, a few random GT boxes each."""
        return make_batch(
            sizes=[(self.height, self.width)] * self.batch_size,
            boxes_per_image=[BOXES_PER_IMAGE] * self.batch_size,
            num_classes=self.cfg.MODEL.RETINANET.NUM_CLASSES,
            seed=self.seed,
        )

    @cached_property
    def padded_size(self) -> Tuple[int, int]:
        """(H, W) of the student's padded input batch (what the teacher's batch is padded to)."""
        with torch.no_grad():
            images = self.model.student.preprocess_image(self.batch)
        return tuple(images.tensor.shape[-2:])

    @cached_property
    def captured(self) -> DistillInputs:
        """What ``model.distill_inputs`` hands the losses for the batch, from one no_grad
        forward of both models."""
        with torch.no_grad():
            _, inputs = self.model.distill_inputs(self.batch)
        return inputs


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def train_step(work: Workload, model, optimizer, name: str) -> Runner:
    """One training step as Detectron2's SimpleTrainer runs it: forward, sum of the losses,
    zero_grad, backward, optimizer step."""

    def run() -> Dict[str, float]:
        sync(work.device)
        faults = minor_page_faults()
        start = time.perf_counter()
        losses = model(work.batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        sync(work.device)
        elapsed = time.perf_counter() - start
        work.page_faults.setdefault(name, []).append(minor_page_faults() - faults)
        work.last_losses[name] = total.item()
        # Advance the iteration as the trainer does: DistillMetaArch computes the kd/pcc
        # diagnostic on one step in PCC_PERIOD, as in real training.
        get_event_storage().step()
        return {name: elapsed}

    return run


def run_rounds(
    runners: Dict[str, Runner],
    rounds: int,
    warmup: int,
    calls_per_round: Optional[Dict[str, int]] = None,
    log: bool = True,
) -> Dict[str, List[float]]:
    """Warm-up rounds (discarded), then ``rounds`` interleaved rounds, each calling every
    runner in order (``calls_per_round[kind]`` times, default once); returns the raw samples."""
    calls_per_round = calls_per_round or {}
    samples: Dict[str, List[float]] = {}
    for r in range(-warmup, rounds):
        started = time.perf_counter()
        for kind, runner in runners.items():
            for _ in range(calls_per_round.get(kind, 1)):
                for name, seconds in runner().items():
                    if r >= 0:
                        samples.setdefault(name, []).append(seconds)
        if log:
            label = f"warm-up {r + warmup + 1}/{warmup}" if r < 0 else f"round {r + 1}/{rounds}"
            print(f"  {label}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return samples


def summarize(samples: Dict[str, List[float]]) -> Dict[str, Dict[str, float]]:
    """Median, min, max and count of every kind's samples."""
    return {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
        for k, v in samples.items()
    }


def environment() -> Dict[str, object]:
    """Date, versions and threads: what a timing depends on besides the code."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_malloc": "retain freed" if retains_freed_cpu_memory() else "glibc default",
        "load_average_1min": os.getloadavg()[0],
    }


def noise_warning(stats: Dict[str, Dict[str, float]], kinds) -> List[str]:
    """A WARNING line if the samples of any of ``kinds`` spread by more than NOISE_SPREAD."""
    noisy = [k for k in kinds if stats[k]["max"] > NOISE_SPREAD * stats[k]["min"]]
    if not noisy:
        return []
    return [
        f"WARNING: samples of {noisy} spread by more than {NOISE_SPREAD:.2f}x (max/min): the "
        "machine was busy; rerun on an idle machine or with more --rounds."
    ]


def publish(report: str, result: Dict, path: str) -> None:
    """Prints the report and writes the JSON result to ``path``."""
    print(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(path)}")


def add_run_args(parser: argparse.ArgumentParser, rounds: int, warmup: int) -> None:
    """The options every benchmark takes: rounds, device, seed, threads, allocator."""
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=warmup, help="discarded warm-up rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc behaviour instead of the trainer's CPU setting "
        "(freed memory kept for reuse, pkd.cpu_memory)",
    )


def check_run_args(parser: argparse.ArgumentParser, args) -> None:
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    args.device = resolve_device(args.device)


def configure_process(args) -> None:
    """Torch threads and, on CPU, the allocator setting ``tools/train_net.py`` uses
    (:func:`pkd.cpu_memory.retain_freed_cpu_memory`) unless ``--default-malloc``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.default_malloc:
        retain_freed_cpu_memory()
