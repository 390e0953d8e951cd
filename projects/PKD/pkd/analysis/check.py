"""``tools/check_distill.py``: is a distillation set-up sound, before training?

1. The teacher's COCO box AP on N test images, (a) through its own data path (its own config's
   test mapper and its own preprocessing) and (b) through the distiller's path (the student's test
   images, re-normalised by :meth:`pkd.teacher.FrozenTeacher.preprocess`), plus (b) with the other
   channel order. Fails when the teacher detects (next to) nothing, when (a) and (b) disagree, or
   when the other channel order detects better.
2. Per feature pair, on a few training batches at initialisation: levels, strides, channels, RMS
   of both maps, the Pearson correlation.
3. Per distillation term, on the same batches: its value and the gradient norm it sends into the
   student's FPN maps, next to the detection losses'; a warning, with the weight that would bring
   it to parity, when it is more than 10x or less than 0.1x.
"""
import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from tabulate import tabulate
from torch import Tensor

from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from ..checkpoint import DistillCheckpointer
from ..losses import channel_pearson
from ..meta_arch import DistillMetaArch
from ..run_config import init_weights, load_config, output_dir, seed
from .inputs import build_distiller, teacher_test_mapper, test_dataset, train_batches
from .teacher_check import (
    MIN_TEACHER_AP,
    blind_teacher_message,
    box_ap,
    first_annotated,
    other_format,
)

__all__ = ["check_distill", "format_report", "main", "AP_TOLERANCE", "GRADIENT_RANGE"]

logger = logging.getLogger(__name__)

# (a) and (b) may differ by this much box AP (0-100) before the check fails.
AP_TOLERANCE = 1.0
# A term whose FPN gradient norm is outside this multiple of the detection losses' is flagged.
GRADIENT_RANGE = (0.1, 10.0)
REPORT_FILE = "check_distill.json"


@dataclass
class Findings:
    failures: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _input_size(mapper, record: Dict) -> List[int]:
    return list(mapper(dict(record))["image"].shape)


def check_teacher_ap(cfg, model: DistillMetaArch, num_images: int, findings: Findings) -> Dict:
    """Section 1: the teacher's box AP along both paths on the first ``num_images`` annotated
    test images."""
    name, student_mapper = test_dataset(cfg)
    dicts = first_annotated(DatasetCatalog.get(name), num_images)
    if not dicts:
        raise ValueError(f"The test set {name} has no image with boxes: cannot score the teacher.")
    teacher, student_format = model.teacher, model.student_input_format
    distiller = box_ap(lambda b: teacher.detect(b, student_format), dicts, student_mapper, name)
    swapped = box_ap(
        lambda b: teacher.detect(b, other_format(student_format)), dicts, student_mapper, name
    )
    own_mapper, own_source = teacher_test_mapper(cfg)
    own = box_ap(teacher.model, dicts, own_mapper, name) if own_mapper is not None else None
    section = {
        "dataset": name,
        "num_images": len(dicts),
        "weights": teacher.weights,
        "teacher_format": teacher.input_format,
        "student_format": student_format,
        "own_path_source": own_source,
        "own_path": own,
        "distiller_path": distiller,
        "other_channel_order": swapped,
    }
    ap, swapped_ap = distiller["AP"], swapped["AP"]
    where = f"{len(dicts)} test images"
    if ap < MIN_TEACHER_AP:
        findings.failures.append(
            blind_teacher_message(teacher, ap, where, name, swapped_ap, student_format)
        )
    elif swapped_ap > ap + AP_TOLERANCE:
        findings.failures.append(
            f"channel order: the teacher detects better fed {other_format(teacher.input_format)} "
            f"(AP {swapped_ap:.1f}) than {teacher.input_format} (AP {ap:.1f}), the order its "
            f"config names: its weights were trained with INPUT.FORMAT "
            f"{other_format(teacher.input_format)}. Fix the teacher config's INPUT.FORMAT (or "
            "MODEL.DISTILL.TEACHER.OPTS)."
        )
    if own is not None and abs(own["AP"] - ap) > AP_TOLERANCE:
        own_size = _input_size(own_mapper, dicts[0])[1:]
        student_size = _input_size(student_mapper, dicts[0])[1:]
        differ = " - they differ" if own_size != student_size else ""
        findings.failures.append(
            f"The teacher's AP through the distiller's path ({ap:.1f}) differs from its own data "
            f"path ({own['AP']:.1f}) on {where}: distillation feeds it differently than it was "
            f"evaluated. Input size: the first image is {student_size} (student's test "
            f"resize) vs {own_size} (teacher's own){differ}; "
            f"channel order: the student's images are {student_format}, reordered to the "
            f"teacher's {teacher.input_format}; mean/std: both paths use the teacher's PIXEL_MEAN/"
            "PIXEL_STD. Train the student at the teacher's input size, or check the formats."
        )
    return section


def _rms(x: Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _grad_norm(loss: Tensor, maps: Sequence[Tensor]) -> float:
    """L2 norm of d loss / d maps over all the maps (0 where the loss does not reach them)."""
    grads = torch.autograd.grad(loss, list(maps), retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


def inspect_training_batches(model: DistillMetaArch, batches: List[List[Dict]]) -> Dict:
    """Sections 2 and 3 on ``batches`` at initialisation (means over the batches).

    Returns:
        {"pairs": {student_level: {...}}, "detection": {...}, "terms": {term: {...}}}.
    """
    student_shapes = model.student.backbone.output_shape()
    teacher_shapes = model.teacher.output_shape()
    fpn: Dict[str, Tensor] = {}
    hook = model.student.backbone.register_forward_hook(lambda _m, _a, out: fpn.update(out))
    pairs = {
        s: {"teacher_level": t, "student_stride": student_shapes[s].stride,
            "teacher_stride": teacher_shapes[t].stride,
            "student_channels": student_shapes[s].channels,
            "teacher_channels": teacher_shapes[t].channels,
            "student_rms": [], "teacher_rms": [], "pcc": []}
        for s, t in model.feature_pairs
    }
    detection = {"losses": {}, "value": [], "grad_norm": []}
    terms: Dict[str, Dict] = {}
    model.train()
    try:
        with EventStorage(0):
            for batch in batches:
                student_losses, inputs = model.distill_inputs(batch)
                maps = list(fpn.values())
                total = sum(student_losses.values())
                detection["value"].append(total.item())
                detection["grad_norm"].append(_grad_norm(total, maps))
                for k, v in student_losses.items():
                    detection["losses"].setdefault(k, []).append(v.item())
                pairs_of_step = zip(inputs.levels, inputs.student_features, inputs.teacher_features)
                for level, s, t in pairs_of_step:
                    pairs[level]["student_rms"].append(_rms(s))
                    pairs[level]["teacher_rms"].append(_rms(t))
                    if s.shape[1] == t.shape[1]:
                        pairs[level]["pcc"].append(float(channel_pearson(s, t)))
                for loss_name, values in model.distillation_losses(inputs).items():
                    for term, value in values.items():
                        entry = terms.setdefault(
                            term, {"loss": loss_name, "value": [], "grad_norm": []}
                        )
                        entry["value"].append(value.item())
                        entry["grad_norm"].append(_grad_norm(value, maps))
    finally:
        hook.remove()
        model.eval()

    def mean(values):
        return sum(values) / len(values) if values else None

    for entry in [*pairs.values(), detection, *terms.values()]:
        for key in ("student_rms", "teacher_rms", "pcc", "value", "grad_norm"):
            if key in entry:
                entry[key] = mean(entry[key])
    detection["losses"] = {k: mean(v) for k, v in detection["losses"].items()}
    return {"pairs": pairs, "detection": detection, "terms": terms}


def _weight_advice(model: DistillMetaArch, loss_name: str, ratio: float) -> Dict:
    loss = model.distill_losses[loss_name]
    weight = getattr(loss, "weight", None)
    if isinstance(weight, (int, float)):
        return {"weight": float(weight), "parity_weight": float(weight) / ratio}
    return {"weight": None, "parity_weight": None}


def judge_gradients(model: DistillMetaArch, training: Dict, findings: Findings) -> None:
    """Adds the ratio and parity weight to every term; warns outside GRADIENT_RANGE."""
    det = training["detection"]["grad_norm"]
    low, high = GRADIENT_RANGE
    for term, entry in training["terms"].items():
        if not math.isfinite(entry["value"]):
            findings.failures.append(f"{term} is {entry['value']} at initialisation.")
            continue
        ratio = entry["grad_norm"] / det if det > 0 else math.inf
        entry["ratio"] = ratio
        name = entry["loss"]
        if ratio == 0.0:
            entry.update(weight=None, parity_weight=None)
            findings.warnings.append(
                f"{term}: sends no gradient into the student's FPN maps at initialisation."
            )
            continue
        entry.update(_weight_advice(model, name, ratio))
        if low <= ratio <= high:
            continue
        if entry["parity_weight"] is not None:
            advice = (
                f"{name} weight {entry['weight']:g} -> {entry['parity_weight']:.3g} would bring "
                f"it to parity (MODEL.DISTILL.{name}.WEIGHT; LazyConfig model.losses.{name}.weight)"
            )
        else:
            advice = (
                f"scaling {name}'s term weights (MODEL.DISTILL.{name}.*) by {1 / ratio:.3g} would "
                "bring it to parity"
            )
        findings.warnings.append(
            f"{term}: its gradient on the student's FPN is {ratio:.3g}x the detection losses' "
            f"({'> ' + format(high, 'g') if ratio > high else '< ' + format(low, 'g')}x); {advice}."
        )


def check_distill(cfg, num_images: int = 8, num_batches: int = 2) -> Dict:
    """Runs every check of this module on a loaded config (yacs or LazyConfig).

    Returns:
        the report (JSON-serialisable): "sound", "failures", "warnings" and one section per check.
    """
    findings = Findings()
    seed_all_rng(seed(cfg))  # as default_setup does before training: the same initialisation
    model = build_distiller(cfg)
    student_weights = init_weights(cfg)
    if student_weights:  # as the trainer loads it before the first iteration
        DistillCheckpointer(model.student).load(student_weights, checkpointables=[])
    teacher = check_teacher_ap(cfg, model, num_images, findings)
    training = inspect_training_batches(model, train_batches(cfg, num_batches))
    judge_gradients(model, training, findings)
    return {
        "sound": not findings.failures,
        "failures": findings.failures,
        "warnings": findings.warnings,
        "teacher": teacher,
        "feature_pairs": training["pairs"],
        "detection": training["detection"],
        "loss_terms": training["terms"],
        "num_batches": num_batches,
        "student_weights": student_weights,
        "schedule": {"warmup_iters": model.warmup_iters, "stop_iter": model.stop_iter},
    }


def _f(value, fmt=".3g") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: Dict) -> str:
    """The report as text tables, failures and warnings last."""
    t = report["teacher"]
    lines = [
        f"== Teacher: box AP on {t['num_images']} images of {t['dataset']} "
        f"(weights: {t['weights']}; teacher {t['teacher_format']}, student {t['student_format']})",
        tabulate(
            [
                ["(a) its own data path", _f((t["own_path"] or {}).get("AP"), ".1f"),
                 _f((t["own_path"] or {}).get("AP50"), ".1f"), t["own_path_source"]],
                ["(b) the distiller's path", _f(t["distiller_path"]["AP"], ".1f"),
                 _f(t["distiller_path"].get("AP50"), ".1f"), "the student's test images"],
                [f"(b) fed {other_format(t['teacher_format'])}",
                 _f(t["other_channel_order"]["AP"], ".1f"),
                 _f(t["other_channel_order"].get("AP50"), ".1f"), "the other channel order"],
            ],
            headers=["path", "AP", "AP50", "source"],
            tablefmt="pipe",
        ),
        "",
        f"== Feature pairs at initialisation (mean over {report['num_batches']} training batches; "
        f"student weights: {report['student_weights'] or 'its own initialisation'})",
        tabulate(
            [
                [f"{s} <- {p['teacher_level']}", f"{p['student_stride']} / {p['teacher_stride']}",
                 f"{p['student_channels']} / {p['teacher_channels']}", _f(p["student_rms"]),
                 _f(p["teacher_rms"]), _f(p["pcc"], ".3f")]
                for s, p in report["feature_pairs"].items()
            ],
            headers=["student <- teacher", "strides", "channels", "student RMS", "teacher RMS",
                     "Pearson r"],
            tablefmt="pipe",
        ),
        "",
        "== Loss terms at initialisation: value and gradient norm on the student's FPN maps "
        "(full weight" + (f"; WARMUP_ITERS {report['schedule']['warmup_iters']} ramps it from 0"
                          if report["schedule"]["warmup_iters"] else "") + ")",
        tabulate(
            [["detection losses (sum)", _f(report["detection"]["value"]),
              _f(report["detection"]["grad_norm"]), "1", "", ""]]
            + [
                [term, _f(e["value"]), _f(e["grad_norm"]), _f(e.get("ratio")),
                 _f(e.get("weight"), "g"), _f(e.get("parity_weight"))]
                for term, e in report["loss_terms"].items()
            ],
            headers=["term", "value", "grad norm", "x detection", "weight", "parity weight"],
            tablefmt="pipe",
        ),
        "",
    ]
    for failure in report["failures"]:
        lines.append("FAIL: " + failure)
    for warning in report["warnings"]:
        lines.append("WARNING: " + warning)
    lines.append(
        "SOUND: the set-up passed every check." if report["sound"]
        else f"NOT SOUND: {len(report['failures'])} failure(s)."
    )
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(
        epilog="""
Examples:

  tools/check_distill.py --config-file configs/Demo/PKD-RetinaNet-R18.yaml
  tools/check_distill.py --config-file configs/Demo/PKD-RetinaNet-R18.py --num-images 16 \\
      model.teacher.weights=output/demo/teacher/model_final.pth

Exit status 0: sound (warnings may be printed); 1: a check failed.
"""
    )
    parser.add_argument("--num-images", type=int, default=8,
                        help="test images the teacher is scored on (with boxes)")
    parser.add_argument("--num-batches", type=int, default=2,
                        help="training batches the feature and gradient statistics average over")
    parser.add_argument("--output", help="folder for check_distill.json (default: OUTPUT_DIR)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = argument_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    report = check_distill(cfg, args.num_images, args.num_batches)
    report["config_file"] = args.config_file
    print(format_report(report), flush=True)
    folder = args.output or output_dir(cfg)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, REPORT_FILE)
    with open(path, "w") as f:
        json.dump(_json_safe(report), f, indent=2)
    print(f"(written to {path})")
    return 0 if report["sound"] else 1
