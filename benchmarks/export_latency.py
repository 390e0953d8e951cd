#!/usr/bin/env python
"""CPU latency of a student in PyTorch, exported to TorchScript, and exported to ONNX
(onnxruntime), on demo validation images; and how far the exported outputs are from PyTorch's.

The student is the one of ``--config`` (a distillation or plain config) with ``--weights``; by
default the demo's PKD student that ``make demo`` trains. Both exports go through
``pkd.export.export_from_config`` (what ``tools/export_model.py`` runs) into a temporary
directory. Each image is one call with one preprocessed image (the config's test-time resize is
done before timing), as a deployment runs it. After ``--warmup`` discarded passes over the images
(TorchScript's profiling executor optimises the graph during its first runs on each input size),
the three kinds run interleaved for ``--rounds`` rounds, so that machine noise hits them alike;
the table shows the median and 90th percentile per image.

    .venv/bin/python benchmarks/export_latency.py --threads 1
    .venv/bin/python benchmarks/export_latency.py --random-weights --images 8 --rounds 2  # quick
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from detectron2.utils.logger import setup_logger

from pkd.data import DEMO_VAL, register_demo_datasets
from pkd.export import (
    ExportedDetector,
    check_export,
    export_from_config,
    load_student,
    load_student_weights,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, publish  # noqa: E402  (the benchmarks' shared helpers)

DEFAULT_CONFIG = os.path.join(REPO, "configs", "Demo", "PKD-RetinaNet-MobileNetV2.yaml")
DEFAULT_WEIGHTS = os.path.join(REPO, "output", "demo", "student_pkd", "model_final.pth")
KINDS = ("pytorch", "torchscript", "onnxruntime")


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--random-weights", action="store_true",
                        help="a seeded random student instead of --weights (quick check)")
    parser.add_argument("--images", type=int, default=20, help="demo val images per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="discarded passes per kind")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                       "export_latency.json"))
    args = parser.parse_args(argv)
    if not args.random_weights and not os.path.isfile(args.weights):
        parser.error(f"{args.weights} does not exist: run `make demo` (it trains the PKD student), "
                     "pass --weights, or use --random-weights.")
    return args


def timed_calls(fn: Callable, images: List[torch.Tensor]) -> List[float]:
    samples = []
    for image in images:
        start = time.perf_counter()
        fn(image)
        samples.append(time.perf_counter() - start)
    return samples


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logger(name="pkd")
    register_demo_datasets()
    student = load_student(args.config)
    torch.manual_seed(0)
    model = student.build_model()
    if not args.random_weights:
        load_student_weights(model, args.weights)
    loader = student.test_loader(DEMO_VAL)
    inputs = [batch[0] for batch, _ in zip(loader, range(args.images))]
    images = [x["image"].float() for x in inputs]

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if args.random_weights:
            weights = os.path.join(tmp, "random.pth")
            torch.save({"model": model.state_dict()}, weights)
        exported = {}
        for fmt in ("torchscript", "onnx"):
            export_from_config(args.config, weights, fmt, os.path.join(tmp, fmt))
            exported[fmt] = ExportedDetector(os.path.join(tmp, fmt), onnx_threads=args.threads)

        def pytorch(image):
            with torch.no_grad():
                return model([{"image": image}])

        runners = {"pytorch": pytorch, "torchscript": exported["torchscript"].detect,
                   "onnxruntime": exported["onnx"].detect}
        for _ in range(args.warmup):
            for fn in runners.values():
                timed_calls(fn, images)
        samples = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind in KINDS:
                samples[kind] += timed_calls(runners[kind], images)
        agreement = {fmt: check_export(model, exported[fmt], inputs) for fmt in exported}

    stats = {
        kind: {"median_ms": 1000 * statistics.median(v),
               "p90_ms": 1000 * statistics.quantiles(v, n=10)[-1],
               "samples": len(v)}
        for kind, v in samples.items()
    }
    result = {
        "config": os.path.relpath(args.config, REPO),
        "weights": "random (seeded)" if args.random_weights else os.path.relpath(args.weights, REPO),
        "images": args.images,
        "image_sizes": sorted({tuple(im.shape[-2:]) for im in images}),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "stats": stats,
        "agreement_with_pytorch": {"torchscript": agreement["torchscript"],
                                   "onnxruntime": agreement["onnx"]},
        "environment": environment(),
    }
    publish(format_report(result), result, args.json)
    return result


def format_report(result: Dict) -> str:
    base = result["stats"]["pytorch"]["median_ms"]
    lines = [
        f"{result['config']} student, {result['weights']}: {result['images']} demo val images, "
        f"{result['rounds']} rounds, {result['environment']['threads']} thread(s)",
        f"{'kind':<12} {'median ms':>10} {'p90 ms':>8} {'vs PyTorch':>11} "
        f"{'max |d box| px':>15} {'max |d score|':>14}",
    ]
    for kind in KINDS:
        s = result["stats"][kind]
        a = result["agreement_with_pytorch"].get(kind)
        diffs = (f"{a['max_box_diff_px']:>15.2e} {a['max_score_diff']:>14.2e}"
                 + ("" if a["same_count_and_classes"] else "  (different detections!)")
                 if a else f"{'-':>15} {'-':>14}")
        lines.append(f"{kind:<12} {s['median_ms']:>10.1f} {s['p90_ms']:>8.1f} "
                     f"{s['median_ms'] / base:>10.2f}x {diffs}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
