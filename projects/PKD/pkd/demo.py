"""``make demo``: distillation end to end on the built-in dataset, on a CPU, with no download.

1. build and register the demo dataset (pkd.data);
2. train each teacher the requested methods name, once; it is cached next to the weights path the
   method's config gives (PKD, MSE, FGD: a two-stage Faster R-CNN in ``output/demo/teacher``;
   RM-PFI, PGD: a RetinaNet-R34 in ``output/demo/retina_teacher``);
3. train the RetinaNet student without distillation and, for the same iterations, with each
   requested method (``configs/Demo/<METHOD>-RetinaNet-R18.yaml``; PKD by default);
4. evaluate everything with COCO box AP — the distilled students also from their exported
   ``model_final.pth`` by plain Detectron2 (``tools/plain_eval.py``, no ``pkd`` import) —, print one
   table and write it to ``output/demo/results.json``;
5. write the distillation report of each distilled student against the plain one
   (``output/demo/student_<method>/report.html``, :mod:`pkd.analysis.report`).

Every training runs ``tools/train_net.py`` in a subprocess, so Detectron2's own logs (with ETA)
show the progress.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .analysis.report import write_report
from .data import DEMO_TRAIN, DEMO_VAL, register_demo_datasets

__all__ = ["main", "run_demo"]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEMO_CONFIGS = os.path.join(REPO, "configs", "Demo")
STUDENT_CONFIG = os.path.join(DEMO_CONFIGS, "RetinaNet-R18.yaml")
RESULTS_FILE = "eval_results.json"  # written by pkd.engine.main into OUTPUT_DIR


def _method_config(method: str) -> str:
    path = os.path.join(DEMO_CONFIGS, f"{method}-RetinaNet-R18.yaml")
    if not os.path.isfile(path):
        available = sorted(
            f.split("-RetinaNet-R18.yaml")[0]
            for f in os.listdir(DEMO_CONFIGS)
            if f.endswith("-RetinaNet-R18.yaml")
        )
        raise SystemExit(f"No demo config for method '{method}' ({path}); available: {available}")
    return path


def _run(cmd: Sequence[str]) -> float:
    print("\n$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd),
          flush=True)
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, cwd=REPO)
    return time.perf_counter() - start


def _train(config: str, output_dir: str, opts: Sequence[str] = ()) -> float:
    return _run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
         "OUTPUT_DIR", output_dir, *opts]
    )


def _box_ap(path: str) -> Dict[str, float]:
    with open(path) as f:
        return json.load(f)["bbox"]


def _digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _teacher_of(method_config: str, output_root: str) -> Tuple[str, str]:
    """(teacher config, teacher weights) that a demo distillation config names; the weights'
    folder (e.g. ``teacher`` in ``output/demo/teacher/model_final.pth``) is put in output_root."""
    from .config import get_distill_cfg

    cfg = get_distill_cfg()
    cfg.merge_from_file(method_config)
    weights = cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    folder = os.path.basename(os.path.dirname(weights))
    return cfg.MODEL.DISTILL.TEACHER.CONFIG, os.path.join(output_root, folder, os.path.basename(weights))


def _teacher(config: str, weights: str, retrain: bool) -> Dict:
    """Trains a teacher into ``dirname(weights)`` unless a checkpoint of the same config and
    dataset is cached there."""
    out = os.path.dirname(weights)
    stamp_file = os.path.join(out, "demo_stamp.json")
    stamp = {"config": _digest([config, os.path.join(DEMO_CONFIGS, "Base-Demo.yaml")]),
             "dataset": _digest([register_demo_datasets()[DEMO_TRAIN][0]])}
    cached = (
        not retrain
        and os.path.isfile(weights)
        and os.path.isfile(os.path.join(out, RESULTS_FILE))
        and os.path.isfile(stamp_file)
        and json.load(open(stamp_file)) == stamp
    )
    name = os.path.basename(config)[: -len(".yaml")]
    if cached:
        print(f"[demo] teacher {name}: cached in {os.path.relpath(out, REPO)} "
              "(make demo RETRAIN=1 trains it again)")
        seconds = None
    else:
        seconds = _train(config, out)
        with open(stamp_file, "w") as f:
            json.dump(stamp, f)
    return {"name": f"teacher: {name}", "seconds": seconds,
            "bbox": _box_ap(os.path.join(out, RESULTS_FILE)), "output_dir": out}


def _plain_eval(weights: str, output_json: str) -> Dict[str, float]:
    json_file, image_dir = register_demo_datasets()[DEMO_VAL]
    _run([sys.executable, os.path.join(REPO, "tools", "plain_eval.py"),
          "--config-file", STUDENT_CONFIG, "--weights", weights,
          "--dataset", DEMO_VAL, json_file, image_dir, "--json", output_json])
    return _box_ap(output_json)


def run_demo(output_root: str, methods: Sequence[str], retrain_teacher: bool = False) -> List[Dict]:
    """Runs the whole demo; returns one row per trained model."""
    register_demo_datasets()
    configs = {method: _method_config(method) for method in methods}
    teachers = {method: _teacher_of(config, output_root) for method, config in configs.items()}
    rows = [_teacher(config, weights, retrain_teacher)
            for config, weights in dict.fromkeys(teachers.values())]

    out = os.path.join(output_root, "student")
    seconds = _train(STUDENT_CONFIG, out)
    rows.append({"name": "student: RetinaNet R18-FPN, no KD", "seconds": seconds,
                 "bbox": _box_ap(os.path.join(out, RESULTS_FILE)), "output_dir": out})
    for method, config in configs.items():
        out = os.path.join(output_root, f"student_{method.lower()}")
        seconds = _train(config, out, ["MODEL.DISTILL.TEACHER.WEIGHTS", teachers[method][1]])
        rows.append({"name": f"student: RetinaNet R18-FPN + {method}", "seconds": seconds,
                     "bbox": _box_ap(os.path.join(out, RESULTS_FILE)), "output_dir": out})
        weights = os.path.join(out, "model_final.pth")
        plain = _plain_eval(weights, os.path.join(out, "plain_eval.json"))
        rows.append({"name": "  same, model_final.pth in plain Detectron2", "seconds": None,
                     "bbox": plain, "output_dir": out})
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    lines = [f"{'model':<46} {'AP':>6} {'AP50':>6} {'AP75':>6} {'train s':>8}", "-" * 76]
    for r in rows:
        b = r["bbox"]
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(f"{r['name']:<46} {b['AP']:>6.1f} {b['AP50']:>6.1f} {b['AP75']:>6.1f} {secs:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description="Detectron2-PKD CPU demo")
    parser.add_argument("--methods", default="PKD",
                        help="comma-separated distillation methods to compare (default: PKD)")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--retrain-teacher", action="store_true")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        _method_config(m)
    start = time.perf_counter()
    rows = run_demo(os.path.abspath(args.output), methods, args.retrain_teacher)
    table = format_table(rows)
    results = os.path.join(args.output, "results.json")
    with open(results, "w") as f:
        json.dump({"rows": rows, "total_seconds": time.perf_counter() - start}, f, indent=2)
    rel = os.path.relpath(args.output, REPO)
    print(f"\nDetectron2-PKD demo — box AP on {DEMO_VAL} (COCO metric), "
          f"{time.perf_counter() - start:.0f} s in all\n{table}\n(written to {rel}/results.json)")
    print(
        "\nNext:\n"
        f"  .venv/bin/python tools/train_net.py --config-file configs/Demo/PKD-RetinaNet-R18.py "
        f"model.teacher.weights={rel}/teacher/model_final.pth train.max_iter=100   # LazyConfig\n"
        f"  .venv/bin/python tools/train_net.py --config-file configs/Demo/RetinaNet-R18.yaml "
        f"--eval-only MODEL.WEIGHTS {rel}/student_pkd/model_final.pth   # the student alone\n"
        "  .venv/bin/tensorboard --logdir output/demo   # loss_pkd_* and kd/pcc_* curves\n"
        "  COCO recipes: README.md, 'The published COCO recipes'"
    )
    write_reports(args.output, methods)
    return rows


def write_reports(output_root: str, methods: Sequence[str]) -> List[str]:
    """The distillation report (tools/report_distill.py) of each method's student against the
    student trained without KD; prints each page's path."""
    paths = []
    for method in methods:
        run = os.path.join(output_root, f"student_{method.lower()}")
        paths.append(write_report(run, baseline_dir=os.path.join(output_root, "student")))
        print(f"Distillation report ({method} vs no KD): {os.path.relpath(paths[-1], REPO)}")
    return paths
