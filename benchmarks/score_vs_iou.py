#!/usr/bin/env python
"""Does a trained dense student's score pick its best box? A diagnostic for the accuracy study.

NMS keeps, among the boxes a dense detector predicts for one object, the one it scores highest.
AP75 therefore depends on two things: how good the student's boxes are, and whether its scores
rank them by quality. This script separates the two on held-out images. For each GT object, over
the anchors the student's own label assignment makes positive for it (the anchors Rank
Mimicking re-ranks), it takes each anchor's score for the GT's class and the IoU of the box the
student decodes there with the GT, and reports, per run:

- ``best IoU``: the best box among them (box quality);
- ``top IoU``: the IoU of the highest-scored one (what NMS keeps);
- ``top >= .75``: how often that box would count at AP75;
- ``Spearman``: the rank correlation of score and IoU over the anchors (ranking quality).

  .venv/bin/python benchmarks/score_vs_iou.py output/accuracy/baseline/seed0 \\
      output/accuracy/dense_RM+PFI/seed0 [--num-images 300] [--dataset pkd_demo_test]

Each RUN is a finished run of a RetinaNet/FCOS student, plain or distilled, yacs or LazyConfig
(its saved ``config.yaml`` and ``model_final.pth``; a distillation run is read as its student
alone, the teacher is not built).
"""
import argparse
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage

from pkd.export import load_student, load_student_weights
from pkd.run_config import register_builtin_datasets
from pkd.students import run_student

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, publish  # noqa: E402  (the benchmarks' shared helpers)

STATISTICS = ("best_iou", "top_iou", "top_at_75", "spearman")
HEADERS = ("best IoU", "top IoU", "top >= .75", "Spearman")


def _ranks(values: Tensor) -> Tensor:
    return values.argsort().argsort().float()


def gt_statistics(scores: Tensor, ious: Tensor) -> Optional[Dict[str, float]]:
    """One GT's statistics over its positive anchors.

    Args:
        scores, ious: (P,) the student's score for the GT's class and its decoded box's IoU with
            the GT at each of the GT's P positive anchors.

    Returns:
        {"best_iou", "top_iou", "top_at_75", "spearman"}; None when P < 2 (no ranking to judge).
    """
    if scores.numel() < 2:
        return None
    top = ious[scores.argmax()]
    rank_s, rank_i = _ranks(scores), _ranks(ious)
    rank_s, rank_i = rank_s - rank_s.mean(), rank_i - rank_i.mean()
    spearman = (rank_s * rank_i).sum() / (rank_s.norm() * rank_i.norm()).clamp(min=1e-12)
    return {"best_iou": float(ious.max()), "top_iou": float(top),
            "top_at_75": float(top >= 0.75), "spearman": float(spearman)}


def _student(run_dir: str):
    """(the run's StudentConfig, its student alone with the final weights)."""
    student = load_student(os.path.join(run_dir, "config.yaml"))
    model = student.build_model()
    load_student_weights(model, os.path.join(run_dir, "model_final.pth"))
    # Training mode makes the student run its own label assignment; its norms keep eval behaviour.
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return student, model


def run_statistics(run_dir: str, dataset: Optional[str], num_images: int) -> Dict:
    """Means over the GTs of the first ``num_images`` images of ``dataset`` (default: the run's
    test set), prepared by the run's own test-time mapper."""
    student, model = _student(run_dir)
    dataset = dataset or student.test_dataset
    register_builtin_datasets([dataset])
    mapper = student.mapper()
    mapper.is_train = True  # the test-time resize, and keep the annotations: the GT is measured
    per_gt: List[Dict[str, float]] = []
    with torch.no_grad(), EventStorage():
        for record in DatasetCatalog.get(dataset)[:num_images]:
            inputs = mapper(record)
            outputs = run_student(model, [inputs], dense=True)
            head, matched = outputs.head, outputs.matched_gt[0]
            instances = inputs["instances"]
            boxes = model.box2box_transform.apply_deltas(head.flat_deltas[0], head.anchors)
            for gt in range(len(instances)):
                anchors = (matched == gt).nonzero().squeeze(1)
                cls = int(instances.gt_classes[gt])
                ious = pairwise_iou(Boxes(boxes[anchors]), instances.gt_boxes[gt])[:, 0]
                stats = gt_statistics(head.flat_logits[0, anchors, cls].sigmoid(), ious)
                if stats is not None:
                    per_gt.append(stats)
    if not per_gt:
        raise SystemExit(f"{run_dir}: no GT with two or more positive anchors in {dataset}.")
    means = {k: statistics.fmean(s[k] for s in per_gt) for k in STATISTICS}
    return {"run": run_dir, "dataset": dataset, "images": num_images, "gts": len(per_gt), **means}


def format_table(rows: Sequence[Dict]) -> str:
    width = max(len(os.path.relpath(r["run"])) for r in rows)
    lines = [f"{'run':<{width}} {'GTs':>5} " + " ".join(f"{h:>10}" for h in HEADERS),
             "-" * (width + 6 + 11 * len(HEADERS))]
    for row in rows:
        lines.append(f"{os.path.relpath(row['run']):<{width}} {row['gts']:>5} "
                     + " ".join(f"{row[k]:>10.3f}" for k in STATISTICS))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories")
    parser.add_argument("--dataset", default=None, help="default: each run's test set")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                       "score_vs_iou.json"))
    args = parser.parse_args(argv)
    rows = [run_statistics(run, args.dataset, args.num_images) for run in args.runs]
    report = {"environment": environment(), "rows": rows,
              "command": " ".join(["benchmarks/score_vs_iou.py", *(argv or sys.argv[1:])])}
    publish(format_table(rows), report, args.json)
    return report


if __name__ == "__main__":
    main()
