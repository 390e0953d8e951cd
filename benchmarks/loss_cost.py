#!/usr/bin/env python
"""Cost of every registered distillation loss beside the student's own training step.

Builds, with random weights and no download, one DistillMetaArch holding every registered loss,
with a RetinaNet-R50-FPN student and a dense RetinaNet-R50-FPN teacher (so that the
prediction-guided losses PGD, RM and PFI can run too), and captures once, on one batch, what its
``distill_inputs`` hands the losses: the paired student/teacher FPN maps, the GT instances, the
padded input size and both dense heads' material. It then times, side by side in one run:

* ``student_step``: the plain student's training step, ``model.student`` (forward + backward +
  SGD step with learning rate 0), exactly as ``step_time.py`` measures it;
* ``<LOSS>`` for each registered loss (PKD, MSE, FGD, PGD, RM, PFI): the loss module's forward +
  backward on the captured inputs. The student's tensors (those that carry a gradient in a
  training step) enter as fresh leaf tensors that require grad (sharing the captured storage),
  so the backward stops there and measures the loss's own cost, not the student's network again;
* ``teacher_dense_head``: ``model.teacher.dense_head`` under no_grad, which DistillMetaArch runs
  once per step when any prediction-guided loss is configured (context, not a loss).

After warm-up the kinds run interleaved in rounds (student step, teacher head, then every loss
in turn, LOSS_CALLS_PER_ROUND times), and medians are reported. Each loss's **share** is its
median over the student step's median; the target is that every feature loss (PKD, MSE, FGD, PGD,
PFI) stays below 5 % of the step. RM imitates logits, not features: it is reported, not checked.

    python benchmarks/loss_cost.py --threads 1 --height 128 --width 160 --rounds 1 --warmup 0
    python benchmarks/loss_cost.py --threads 1          # 2 x 512x683, RetinaNet-R50 at COCO-like size
"""
import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from detectron2.utils.events import EventStorage

from pkd.losses import DistillInputs, registered_loss_names

from common import (
    REPO,
    Preset,
    Runner,
    Workload,
    add_run_args,
    build_cfg,
    check_run_args,
    configure_process,
    environment,
    noise_warning,
    publish,
    run_rounds,
    summarize,
    sync,
    train_step,
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


def make_workload(args, names: Sequence[str]) -> Workload:
    """step_time's workload (random weights, learning rate 0, no download) for a RetinaNet-R50
    student and a RetinaNet-R50 teacher, with ``names`` as MODEL.DISTILL.LOSSES."""
    configure_process(args)
    preset = Preset(RETINANET_R50, RETINANET_R50, args.batch, args.height, args.width)
    cfg = build_cfg(preset, args.device).clone()
    cfg.defrost()
    cfg.MODEL.DISTILL.LOSSES = list(names)
    cfg.freeze()
    return Workload(cfg, args.batch, args.height, args.width, args.seed)


def with_fresh_leaves(value, leaves: List[Tensor]):
    """``value`` (DistillInputs, or a part of it) with every tensor that requires grad replaced
    by a new leaf that requires grad and shares its storage; the new leaves are appended to
    ``leaves``. A backward through the copy stops at these leaves."""
    if isinstance(value, Tensor):
        if not value.requires_grad:
            return value
        leaf = value.detach().requires_grad_()
        leaves.append(leaf)
        return leaf
    if isinstance(value, list):
        return [with_fresh_leaves(v, leaves) for v in value]
    if dataclasses.is_dataclass(value):
        parts = {f.name: with_fresh_leaves(getattr(value, f.name), leaves)
                 for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **parts)
    return value


def capture(work: Workload) -> DistillInputs:
    """``model.distill_inputs`` on the batch, once, with grad: the student's tensors that carry
    a gradient in a training step come back as leaves (the student's graph is freed)."""
    _, inputs = work.model.distill_inputs(work.batch)
    return with_fresh_leaves(inputs, [])


# ----------------------------------------------------------------------------------------------
# The measured kinds: each callable runs one unit of work and returns {name: seconds}
# ----------------------------------------------------------------------------------------------


def loss_step(
    work: Workload, captured: DistillInputs, name: str, reached: Dict[str, bool]
) -> Runner:
    """Forward + backward of the configured loss ``name`` (weights applied) on fresh leaves of
    the captured inputs. Its own parameters' grads are reset beforehand, as zero_grad does.
    Records the loss value and whether the backward reached the student's tensors."""
    loss = work.model.distill_losses[name]

    def run() -> Dict[str, float]:
        leaves: List[Tensor] = []
        inputs = with_fresh_leaves(captured, leaves)
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


def teacher_head_step(work: Workload, captured: DistillInputs) -> Runner:
    """``model.teacher.dense_head`` on the teacher's FPN maps of the batch (shared by PGD, RM
    and PFI), under no_grad."""
    teacher = work.model.teacher
    with torch.no_grad():
        images = teacher.preprocess(
            work.batch, work.model.student_input_format, captured.image_size
        )
        maps = teacher.features(images)

    def run() -> Dict[str, float]:
        sync(work.device)
        start = time.perf_counter()
        teacher.dense_head(maps)
        sync(work.device)
        return {TEACHER_HEAD: time.perf_counter() - start}

    return run


def make_runners(
    work: Workload, captured: DistillInputs, names: Sequence[str], reached: Dict[str, bool]
) -> Dict[str, Runner]:
    """One round's runners in order: student step, teacher head, then all losses in turn,
    LOSS_CALLS_PER_ROUND times. A loss appears under several keys (``PKD#1``, ``PKD#2``, ...);
    its samples are gathered under the name its runner returns (``PKD``)."""
    per_loss = {n: loss_step(work, captured, n, reached) for n in names}
    runners = {
        STUDENT_STEP: train_step(work, work.model.student, work.student_optimizer, STUDENT_STEP),
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
    return "\n".join(lines + noise_warning(stats, [STUDENT_STEP]))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--height", type=int, default=512, help="image height")
    parser.add_argument("--width", type=int, default=683, help="image width")
    add_run_args(parser, rounds=3, warmup=1)
    parser.add_argument("--json", default=DEFAULT_JSON, help="default: %(default)s")
    args = parser.parse_args(argv)
    check_run_args(parser, args)
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
            {"student": s, "teacher": t, "shape": list(x.shape)}
            for (s, t), x in zip(work.model.feature_pairs, captured.student_features)
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
    publish(format_report(result), result, args.json)


if __name__ == "__main__":
    main()
