"""``make demo``: distillation end to end on the built-in dataset, on a CPU, with no download.

1. build and register the demo dataset (pkd.data);
2. train each teacher the requested methods name, once; it is cached next to the weights path the
   method's config gives (PKD, MSE, FGD: the two-stage Faster R-CNN in ``output/demo/teacher``;
   RM-PFI, PGD: the dense RetinaNet in ``output/demo/retina_teacher``);
3. train the student without distillation and, for the same iterations, with each requested
   method (``configs/Demo/<METHOD>-RetinaNet-MobileNetV2.yaml``; PKD by default), once per seed;
4. evaluate everything with COCO box AP on the held-out ``pkd_demo_test`` split — the distilled
   students also from their ``model_final.pth`` in plain Detectron2 (``tools/plain_eval.py``), and
   as TorchScript exported by ``tools/export_model.py`` (AP of the exported model's own
   outputs) —, print one table (with several seeds: mean ± std, and each method's gain over the
   plain student of the same seed) and write it to ``output/demo/results.json``;
5. write the distillation report of each distilled student against the plain one (first seed:
   ``output/demo/student_<method>/report.html``, :mod:`pkd.analysis.report`).

Every training runs ``tools/train_net.py`` in a subprocess, so Detectron2's own logs (with ETA)
show the progress. A training whose output directory holds the results of the same configuration
(config, overrides, teacher weights, dataset and the ``pkd`` source) is not run again.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from .analysis.report import write_report
from .config import get_distill_cfg
from .data import DEMO_TEST, register_demo_datasets
from .export import evaluate_exported
from .teacher import resolve_teacher_config

__all__ = [
    "main",
    "run_demo",
    "train_cached",
    "train_teacher",
    "box_ap",
    "exported_row",
    "format_table",
]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEMO_CONFIGS = os.path.join(REPO, "configs", "Demo")
STUDENT_NAME = "RetinaNet-MobileNetV2"
STUDENT_CONFIG = os.path.join(DEMO_CONFIGS, f"{STUDENT_NAME}.yaml")
RESULTS_FILE = "eval_results.json"  # written by pkd.engine.main into OUTPUT_DIR
STAMP_FILE = "demo_stamp.json"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _method_config(method: str) -> str:
    path = os.path.join(DEMO_CONFIGS, f"{method}-{STUDENT_NAME}.yaml")
    if not os.path.isfile(path):
        suffix = f"-{STUDENT_NAME}.yaml"
        available = sorted(f[: -len(suffix)] for f in os.listdir(DEMO_CONFIGS) if f.endswith(suffix))
        raise SystemExit(f"No demo config for method '{method}' ({path}); available: {available}")
    return path


def _run(cmd: Sequence[str]) -> float:
    print("\n$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd),
          flush=True)
    start = time.perf_counter()
    subprocess.run(list(cmd), check=True, cwd=REPO)
    return time.perf_counter() - start


def _digest_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _source_files() -> List[str]:
    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(PACKAGE_DIR) for f in files
        if f.endswith(".py")
    )


def _stamp(config: str, opts: Sequence[str]) -> Dict[str, str]:
    """What a cached training result depends on: the merged config (OUTPUT_DIR aside), the
    teacher's weights, the training dataset and this package's source."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts))
    cfg.OUTPUT_DIR = ""
    teacher = cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    train_json = register_demo_datasets()[cfg.DATASETS.TRAIN[0]][0]
    return {
        "config": hashlib.sha256(cfg.dump().encode()).hexdigest()[:16],
        "teacher": _digest_files([teacher]) if os.path.isfile(teacher) else teacher,
        "dataset": _digest_files([train_json]),
        "source": _digest_files(_source_files()),
    }


def train_cached(config: str, output_dir: str, opts: Sequence[str] = (),
                 retrain: bool = False) -> Optional[float]:
    """Trains ``config`` (+ ``opts``) into ``output_dir`` with ``tools/train_net.py``, unless the
    directory holds the evaluation results of the very same configuration.

    Returns:
        the training's wall time in seconds, or None when the cached result was used.
    """
    stamp = _stamp(config, [*opts, "OUTPUT_DIR", output_dir])
    stamp_file = os.path.join(output_dir, STAMP_FILE)
    if (
        not retrain
        and os.path.isfile(os.path.join(output_dir, RESULTS_FILE))
        and os.path.isfile(stamp_file)
    ):
        with open(stamp_file) as f:
            if json.load(f) == stamp:
                print(f"[demo] {os.path.relpath(output_dir, REPO)}: cached result of the same "
                      "configuration")
                return None
    seconds = _run([sys.executable, os.path.join(REPO, "tools", "train_net.py"),
                    "--config-file", config, *opts, "OUTPUT_DIR", output_dir])
    with open(stamp_file, "w") as f:
        json.dump(stamp, f)
    return seconds


def box_ap(output_dir: str, results_file: str = RESULTS_FILE) -> Dict[str, float]:
    """COCO box metrics (AP, AP50, ...) a run wrote into its output directory."""
    with open(os.path.join(output_dir, results_file)) as f:
        return json.load(f)["bbox"]


def train_teacher(config: str, output_dir: str, retrain: bool = False) -> Dict:
    """Trains a teacher into ``output_dir`` once (cached as :func:`train_cached`); returns its row
    of the demo table, with ``weights``."""
    name = os.path.basename(config)[: -len(".yaml")]
    seconds = train_cached(config, output_dir, retrain=retrain)
    if seconds is None:
        print(f"[demo] teacher {name}: cached (make demo RETRAIN=1 trains it again)")
    return {"name": f"teacher: {name}", "seconds": seconds, "bbox": box_ap(output_dir),
            "output_dir": output_dir, "weights": os.path.join(output_dir, "model_final.pth")}


def _teacher_of(method_config: str, output_root: str) -> Dict[str, str]:
    """The teacher config a demo distillation config names, and where to train it: the folder of
    its weights path (e.g. ``teacher`` in ``output/demo/teacher/model_final.pth``) under
    ``output_root``."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(method_config)
    folder = os.path.basename(os.path.dirname(cfg.MODEL.DISTILL.TEACHER.WEIGHTS))
    return {"config": resolve_teacher_config(cfg.MODEL.DISTILL.TEACHER.CONFIG),
            "output_dir": os.path.join(output_root, folder)}


def _plain_eval(weights: str, output_json: str) -> Dict[str, float]:
    json_file, image_dir = register_demo_datasets()[DEMO_TEST]
    _run([sys.executable, os.path.join(REPO, "tools", "plain_eval.py"),
          "--config-file", STUDENT_CONFIG, "--weights", weights,
          "--dataset", DEMO_TEST, json_file, image_dir, "--json", output_json])
    with open(output_json) as f:
        return json.load(f)["bbox"]


def exported_row(student_config: str, weights: str, export_dir: str, name: str) -> Dict:
    """Exports a trained student (any student or distillation config, and its weights) to
    TorchScript with ``tools/export_model.py`` and COCO-evaluates the exported model's own
    outputs on the demo's test split (:func:`pkd.export.evaluate_exported`): one table row."""
    _run([sys.executable, os.path.join(REPO, "tools", "export_model.py"),
          "--config-file", student_config, "--weights", weights,
          "--format", "torchscript", "--output", export_dir])
    results = evaluate_exported(export_dir, student_config, dataset=DEMO_TEST,
                                output_dir=export_dir)
    with open(os.path.join(export_dir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
    return {"name": name, "seconds": None, "bbox": results["bbox"], "output_dir": export_dir}


def _seed_dir(output_dir: str, seed: int, seeds: Sequence[int]) -> str:
    return output_dir if len(seeds) == 1 else os.path.join(output_dir, f"seed{seed}")


def _student_row(name: str, dirs: Sequence[str], seconds: Sequence[Optional[float]],
                 baseline: Optional[Dict] = None) -> Dict:
    """One table row over seeds: the mean, the per-seed values and, against ``baseline`` (the
    plain student's row, same seeds), the paired gain."""
    per_seed = [box_ap(d) for d in dirs]
    row = {"name": name, "output_dir": dirs[0], "per_seed": per_seed,
           "bbox": {k: statistics.fmean(b[k] for b in per_seed) for k in ("AP", "AP50", "AP75")},
           "seconds": None if None in seconds else statistics.fmean(seconds)}
    if len(per_seed) > 1:
        row["std"] = {k: statistics.stdev(b[k] for b in per_seed) for k in ("AP", "AP50", "AP75")}
    if baseline is not None:
        gains = [b["AP"] - p["AP"] for b, p in zip(per_seed, baseline["per_seed"])]
        row["gain_AP"] = {"per_seed": gains, "mean": statistics.fmean(gains)}
        if len(gains) > 1:
            row["gain_AP"]["std"] = statistics.stdev(gains)
    return row


def run_demo(output_root: str, methods: Sequence[str], retrain_teacher: bool = False,
             seeds: Sequence[int] = (0,)) -> List[Dict]:
    """Runs the whole demo; returns one row per trained model."""
    register_demo_datasets()
    configs = {method: _method_config(method) for method in methods}
    teachers = {method: _teacher_of(config, output_root) for method, config in configs.items()}
    unique = {t["output_dir"]: t["config"] for t in teachers.values()}
    rows = [train_teacher(config, out, retrain_teacher) for out, config in unique.items()]
    weights = {out: row["weights"] for out, row in zip(unique, rows)}

    def train_students(config: str, output_dir: str, opts: Sequence[str] = ()):
        dirs = [_seed_dir(output_dir, seed, seeds) for seed in seeds]
        seconds = [train_cached(config, d, [*opts, "SEED", str(seed)])
                   for seed, d in zip(seeds, dirs)]
        return dirs, seconds

    baseline = _student_row(f"student: {STUDENT_NAME}, no KD",
                            *train_students(STUDENT_CONFIG, os.path.join(output_root, "student")))
    rows.append(baseline)
    for method, config in configs.items():
        teacher_weights = weights[teachers[method]["output_dir"]]
        dirs, seconds = train_students(
            config, os.path.join(output_root, f"student_{method.lower()}"),
            ["MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights],
        )
        rows.append(_student_row(f"student: {STUDENT_NAME} + {method}", dirs, seconds, baseline))
        plain = _plain_eval(os.path.join(dirs[0], "model_final.pth"),
                            os.path.join(dirs[0], "plain_eval.json"))
        rows.append({"name": "  same, model_final.pth in plain Detectron2", "seconds": None,
                     "bbox": plain, "output_dir": dirs[0]})
        rows.append(exported_row(STUDENT_CONFIG, os.path.join(dirs[0], "model_final.pth"),
                                 os.path.join(dirs[0], "torchscript"),
                                 "  same, exported to TorchScript"))
    return rows


def format_table(rows: Sequence[Dict]) -> str:
    """The demo's table: AP/AP50/AP75 (mean ± std over seeds where there are several), the gain
    in AP over the plain student of the same seed, and the training time."""
    lines = [f"{'model':<50} {'AP':>11} {'AP50':>6} {'AP75':>6} {'gain AP':>13} {'train s':>8}",
             "-" * 99]
    for r in rows:
        b = r["bbox"]
        ap = f"{b['AP']:.1f}" + (f" ± {r['std']['AP']:.1f}" if "std" in r else "")
        gain = r.get("gain_AP")
        gain_text = "-" if gain is None else f"{gain['mean']:+.1f}" + (
            f" ± {gain['std']:.1f}" if "std" in gain else "")
        secs = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"{r['name']:<50} {ap:>11} {b['AP50']:>6.1f} {b['AP75']:>6.1f} "
                     f"{gain_text:>13} {secs:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description="Detectron2-PKD CPU demo")
    parser.add_argument("--methods", default="PKD",
                        help="comma-separated distillation methods to compare (default: PKD)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated training seeds of the students (default: 0); with "
                             "several, the table shows mean ± std and the paired gain")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--retrain-teacher", action="store_true")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for m in methods:
        _method_config(m)
    start = time.perf_counter()
    rows = run_demo(os.path.abspath(args.output), methods, args.retrain_teacher, seeds)
    table = format_table(rows)
    results = os.path.join(args.output, "results.json")
    with open(results, "w") as f:
        json.dump({"rows": rows, "seeds": seeds, "total_seconds": time.perf_counter() - start},
                  f, indent=2)
    rel = os.path.relpath(args.output, REPO)
    print(f"\nDetectron2-PKD demo — box AP on {DEMO_TEST} (COCO metric), {len(seeds)} seed(s), "
          f"{time.perf_counter() - start:.0f} s in all\n{table}\n(written to {rel}/results.json)")
    print(
        "\nNext:\n"
        f"  .venv/bin/python tools/train_net.py --config-file configs/Demo/PKD-{STUDENT_NAME}.py "
        f"model.teacher.weights={rel}/teacher/model_final.pth   # LazyConfig\n"
        f"  .venv/bin/python tools/train_net.py --config-file {os.path.relpath(STUDENT_CONFIG, REPO)}"
        f" --eval-only MODEL.WEIGHTS {rel}/student_pkd/model_final.pth   # the student alone\n"
        f"  .venv/bin/python tools/export_model.py --config-file {os.path.relpath(STUDENT_CONFIG, REPO)}"
        f" --weights {rel}/student_pkd/model_final.pth --format onnx "
        f"--output {rel}/student_pkd/onnx   # deploy (README: Deploy)\n"
        "  .venv/bin/tensorboard --logdir output/demo   # loss_pkd_* and kd/pcc_* curves\n"
        "  make demo SEEDS=0,1,2   # the gain over three seeds (mean ± std)\n"
        "  COCO recipes: README.md, 'The published COCO recipes'"
    )
    write_reports(rows)
    return rows


def write_reports(rows: Sequence[Dict]) -> List[str]:
    """The distillation report (tools/report_distill.py) of each distilled student (first seed)
    against the student trained without KD (same seed); prints each page's path."""
    students = [r for r in rows if r["name"].startswith("student:")]
    baseline, distilled = students[0], students[1:]
    paths = []
    for row in distilled:
        paths.append(write_report(row["output_dir"], baseline_dir=baseline["output_dir"]))
        print(f"Distillation report ({row['name']} vs no KD): {os.path.relpath(paths[-1], REPO)}")
    return paths
