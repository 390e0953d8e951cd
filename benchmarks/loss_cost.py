#!/usr/bin/env python
"""Cost of every registered distillation loss beside the student's own training step.

Builds, with random weights and no download, a RetinaNet-R50-FPN student and a dense
RetinaNet-R50-FPN teacher (so that the prediction-guided losses PGD, RM and PFI can run too), one
DistillMetaArch holding every registered loss, and captures once, on one batch, what
DistillMetaArch hands its losses: the paired student/teacher FPN maps, the GT instances, the
padded input size and both dense heads' outputs. It then times, side by side in one run:

* ``student_step``: the plain student's training step (forward + backward + SGD step with
  learning rate 0), exactly as ``step_time.py`` measures it;
* ``<LOSS>`` for each registered loss (PKD, MSE, FGD, PGD, RM, PFI): the loss module's forward +
  backward on the captured inputs. The student's maps and head outputs enter as fresh leaf
  tensors that require grad (sharing the captured storage), so the backward stops there and
  measures the loss's own cost, not the student's network again;
* ``teacher_dense_head``: the teacher's dense head under no_grad, which DistillMetaArch runs once
  per step when any prediction-guided loss is configured (context, not a loss).

After warm-up the kinds run interleaved in rounds (student step, teacher head, then every loss
in turn, LOSS_CALLS_PER_ROUND times), and medians are reported. Each loss's **share** is its
median over the student step's median; the target is that every feature loss (PKD, MSE, FGD, PGD,
PFI) stays below 5 % of the step. RM imitates logits, not features: it is reported, not checked.

    python benchmarks/loss_cost.py --threads 1 --height 128 --width 160 --rounds 1 --warmup 0
    python benchmarks/loss_cost.py --threads 1          # 2 x 512x683, the issue's measurement
"""
import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from pkd.losses import DensePredictions, DistillInputs, registered_loss_names
from pkd.students import run_student

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import (  # noqa: E402  (the step-time benchmark's workload and helpers)
    NOISE_SPREAD,
    REPO,
    Preset,
    Runner,
    Workload,
    add_process_args,
    build_cfg,
    configure_process,
    environment,
    resolve_device,
    run_rounds,
    summarize,
    sync,
    train_step,
    write_json,
)

RETINANET_R50 = "COCO-Detection/retinanet_R_50_FPN_3x.yaml"
# Table order; a loss registered later but not named here is timed too, after these.
LOSS_ORDER = ("PKD", "MSE", "FGD", "PGD", "RM", "PFI")
# Losses that imitate feature maps, held to SHARE_TARGET. RM imitates the head's logits.
FEATURE_LOSSES = ("PKD", "MSE", "FGD", "PGD", "PFI")
SHARE_TARGET = 0.05
# Samples of each loss per round: one loss call is short, so one sample would be mostly noise.
LOSS_CALLS_PER_ROUND = 5
STUDENT_STEP = "student_step"
TEACHER_HEAD = "teacher_dense_head"
DEFAULT_JSON = os.path.join(REPO, "benchmarks", "results", "loss_cost.json")


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def loss_names() -> List[str]:
    """Every registered loss, LOSS_ORDER first."""
    registered = registered_loss_names()
    return [n for n in LOSS_ORDER if n in registered] + [
        n for n in registered if n not in LOSS_ORDER
    ]


def build_loss_cfg(args, names: Sequence[str]):
    """step_time's distillation config (random weights, learning rate 0, no download) for a
    RetinaNet-R50 student and a RetinaNet-R50 teacher, with ``names`` as MODEL.DISTILL.LOSSES."""
    preset = Preset(RETINANET_R50, RETINANET_R50, args.batch, args.height, args.width)
    cfg = build_cfg(preset, args.device).clone()
    cfg.defrost()
    cfg.MODEL.DISTILL.LOSSES = list(names)
    cfg.freeze()
    return cfg


def make_workload(args, names: Sequence[str]) -> Workload:
    """The models and batch (built lazily by step_time's Workload)."""
    configure_process(args)
    cfg = build_loss_cfg(args, names)
    return Workload(cfg, args.batch, args.height, args.width, args.seed)


@dataclass
class Captured:
    """One no_grad forward of DistillMetaArch's student and teacher on the batch: the material
    of every loss call. Student tensors are kept detached; each call wraps them in new leaves."""

    model: torch.nn.Module  # the DistillMetaArch
    student_maps: Dict[str, Tensor]  # every student FPN level
    student_outputs: List[List[Tensor]]  # the student head's per-level outputs
    teacher_maps: Dict[str, Tensor]
    teacher_head_features: List[Tensor]
    teacher_outputs: List[List[Tensor]]
    gt_instances: List[Instances]
    image_size: Tuple[int, int]

    def distill_inputs(self, with_predictions: bool) -> Tuple[DistillInputs, List[Tensor]]:
        """DistillInputs as ``DistillMetaArch.forward`` builds them, on fresh leaf tensors.

        Returns:
            (inputs, leaves): ``leaves`` are the student tensors requiring grad (the FPN maps,
            and with predictions the head outputs), for checking that a backward reached them.
        """
        model = self.model
        maps = {k: v.detach().requires_grad_() for k, v in self.student_maps.items()}
        leaves = list(maps.values())
        inputs = DistillInputs(
            levels=[s for s, _ in model.feature_pairs],
            student_features=[maps[s] for s, _ in model.feature_pairs],
            teacher_features=[self.teacher_maps[t] for _, t in model.feature_pairs],
            gt_instances=self.gt_instances,
            image_size=self.image_size,
        )
        if with_predictions:
            outputs = [[x.detach().requires_grad_() for x in kind] for kind in self.student_outputs]
            leaves += [x for kind in outputs for x in kind]
            inputs.predictions = DensePredictions(
                student=model.student,
                teacher=model.teacher.model,
                student_features=[maps[f] for f in model.student.head_in_features],
                teacher_features=self.teacher_head_features,
                student_outputs=outputs,
                teacher_outputs=self.teacher_outputs,
            )
        return inputs, leaves


@torch.no_grad()
def capture(work: Workload) -> Captured:
    """Runs DistillMetaArch's student (keeping its head outputs) and teacher (backbone+FPN and
    dense head) once on the batch, the way its training forward does."""
    model = work.distill
    outputs = run_student(model.student, work.batch, keep_predictions=True)
    padded = tuple(outputs.images.shape[-2:])
    images = model.teacher.preprocess(work.batch, model.student_input_format, padded)
    teacher_maps = model.teacher.features(images)
    head_features, teacher_outputs = model.teacher.dense_head(teacher_maps)
    return Captured(
        model=model,
        student_maps=dict(outputs.features),
        student_outputs=outputs.predictions,
        teacher_maps=teacher_maps,
        teacher_head_features=head_features,
        teacher_outputs=teacher_outputs,
        gt_instances=[x["instances"].to(model.device) for x in work.batch],
        image_size=padded,
    )


# ----------------------------------------------------------------------------------------------
# The measured kinds: each callable runs one unit of work and returns {name: seconds}
# ----------------------------------------------------------------------------------------------


def loss_step(work: Workload, captured: Captured, name: str, reached: Dict[str, bool]) -> Runner:
    """Forward + backward of the configured loss ``name`` (weights applied) on fresh leaves of
    the captured inputs. Its own parameters' grads are reset beforehand, as zero_grad does.
    Records the loss value and whether the backward reached the student's tensors."""
    loss = work.distill.distill_losses[name]
    with_predictions = getattr(loss, "needs_predictions", False)

    def run() -> Dict[str, float]:
        inputs, leaves = captured.distill_inputs(with_predictions)
        loss.zero_grad(set_to_none=True)
        sync(work.device)
        start = time.perf_counter()
        total = sum(loss(inputs).values())
        total.backward()
        sync(work.device)
        elapsed = time.perf_counter() - start
        work.last_losses[name] = total.item()
        reached[name] = any(leaf.grad is not None for leaf in leaves)
        return {name: elapsed}

    return run


def teacher_head_step(work: Workload, captured: Captured) -> Runner:
    """The teacher's dense head under no_grad on its captured FPN maps (shared by PGD/RM/PFI)."""
    teacher = work.distill.teacher

    def run() -> Dict[str, float]:
        sync(work.device)
        start = time.perf_counter()
        teacher.dense_head(captured.teacher_maps)
        sync(work.device)
        return {TEACHER_HEAD: time.perf_counter() - start}

    return run


def make_runners(
    work: Workload, captured: Captured, names: Sequence[str], reached: Dict[str, bool]
) -> Dict[str, Runner]:
    """One round's runners in order: student step, teacher head, then all losses in turn,
    LOSS_CALLS_PER_ROUND times. A loss appears under several keys (``PKD#1``, ``PKD#2``, ...);
    its samples are gathered under the name its runner returns (``PKD``)."""
    per_loss = {n: loss_step(work, captured, n, reached) for n in names}
    runners = {
        STUDENT_STEP: train_step(work, work.student, work.student_optimizer, STUDENT_STEP),
        TEACHER_HEAD: teacher_head_step(work, captured),
    }
    for i in range(LOSS_CALLS_PER_ROUND):
        runners.update({f"{n}#{i + 1}": per_loss[n] for n in names})
    return runners


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def compute_shares(stats: Dict[str, Dict[str, float]], kinds: Sequence[str]) -> Dict[str, Dict]:
    """Per kind: share of the student step (of the medians, and of the minima as a check that is
    robust to load from other processes) and, for feature losses, whether it meets the target."""
    step = stats[STUDENT_STEP]
    result = {}
    for kind in kinds:
        share = stats[kind]["median"] / step["median"]
        result[kind] = {
            "share": share,
            "share_of_minima": stats[kind]["min"] / step["min"],
            "meets_target": share < SHARE_TARGET if kind in FEATURE_LOSSES else None,
        }
    return result


def _row(label: str, stats: Dict[str, float], share: Optional[Dict] = None) -> str:
    """One table line: median, min, n and, for a kind other than the step, its shares."""
    line = f"{label:<30}{stats['median']:10.4f}{stats['min']:10.4f}{stats['n']:4d}"
    if share is None:
        return line
    verdict = {True: "OK", False: "ABOVE TARGET", None: "-"}[share["meets_target"]]
    return line + f"{100 * share['share']:8.2f}%{100 * share['share_of_minima']:8.2f}%  {verdict}"


def format_report(result: Dict) -> str:
    """The human-readable table and the verdict."""
    stats, shares = result["stats"], result["shares"]
    lines = [
        f"device {result['device']} | {result['threads']} threads | "
        f"malloc: {result['cpu_malloc']} | batch {result['batch']} x "
        f"{result['height']}x{result['width']} (padded {result['padded_size'][0]}x"
        f"{result['padded_size'][1]}) | {result['rounds']} rounds after {result['warmup']} "
        f"warm-up | load average {result['load_average_1min_before']:.1f} before, "
        f"{result['load_average_1min']:.1f} after",
        f"{'kind':<30}{'median s':>10}{'min s':>10}{'n':>4}{'share':>9}{'of min':>9}  "
        f"target (< {100 * SHARE_TARGET:.0f} %)",
        _row("student step (fwd+bwd+SGD)", stats[STUDENT_STEP]),
    ]
    lines += [_row(f"{n} loss fwd+bwd", stats[n], shares[n]) for n in result["losses"]]
    lines.append(_row("teacher dense head (no_grad)", stats[TEACHER_HEAD], shares[TEACHER_HEAD]))
    met, above = result["feature_losses_meeting_target"], result["feature_losses_above_target"]
    lines.append(
        f"feature losses below {100 * SHARE_TARGET:.0f} % of the student step: "
        f"{', '.join(met) or 'none'}; above: {', '.join(above) or 'none'}"
    )
    lines.append(
        "share = median / student step median; RM (logit imitation) and the teacher's dense head "
        "(run once per step for PGD/RM/PFI) are shown for context."
    )
    step = stats[STUDENT_STEP]
    if step["max"] > NOISE_SPREAD * step["min"]:
        lines.append(
            f"WARNING: student step samples spread by more than {NOISE_SPREAD:.2f}x (max/min): the "
            "machine was busy; rerun on an idle machine or with more --rounds."
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--height", type=int, default=512, help="image height")
    parser.add_argument("--width", type=int, default=683, help="image width")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    add_process_args(parser)
    parser.add_argument("--json", default=DEFAULT_JSON, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    args.device = resolve_device(args.device)
    return args


def benchmark(args) -> Dict:
    """The whole measurement; returns the JSON-ready result."""
    load_before = os.getloadavg()[0]
    names = loss_names()
    work = make_workload(args, names)
    reached: Dict[str, bool] = {}
    with EventStorage(0) as storage:
        captured = capture(work)
        runners = make_runners(work, captured, names, reached)
        print(f"Timing {', '.join(names)} beside the student step ...", file=sys.stderr)
        samples = run_rounds(runners, args.rounds, args.warmup)
        diagnostics = {k: v for k, (v, _) in storage.latest().items() if k.startswith("kd/")}
    not_reached = [n for n in names if not reached.get(n)]
    if not_reached:
        raise RuntimeError(f"The backward of {not_reached} did not reach the student's tensors.")
    bad = {k: v for k, v in work.last_losses.items() if not math.isfinite(v)}
    if bad:
        raise RuntimeError(f"Non-finite losses: {bad}")
    stats = summarize(samples)
    share = compute_shares(stats, names + [TEACHER_HEAD])
    feature = [n for n in names if n in FEATURE_LOSSES]
    model = work.distill
    return {
        "device": args.device,
        **environment(),
        "load_average_1min_before": load_before,
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
        "padded_size": list(captured.image_size),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seed": args.seed,
        "loss_calls_per_round": LOSS_CALLS_PER_ROUND,
        "student_config": RETINANET_R50,
        "teacher_config": work.cfg.MODEL.DISTILL.TEACHER.CONFIG,
        "feature_pairs": [
            {"student": s, "teacher": t, "shape": list(captured.student_maps[s].shape)}
            for s, t in model.feature_pairs
        ],
        "losses": names,
        "feature_losses": feature,
        "share_target": SHARE_TARGET,
        "timings": samples,
        "stats": stats,
        "medians": {k: v["median"] for k, v in stats.items()},
        "shares": share,
        "feature_losses_meeting_target": [n for n in feature if share[n]["meets_target"]],
        "feature_losses_above_target": [n for n in feature if not share[n]["meets_target"]],
        "last_loss_values": work.last_losses,
        # e.g. kd/rm_num_gts > 0 and kd/pgd_key_locations_per_gt > 0: RM and PGD did real work.
        "diagnostics": diagnostics,
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    result = benchmark(args)
    print(format_report(result))
    write_json(args.json, result)
    print(f"wrote {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
