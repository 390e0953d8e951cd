#!/usr/bin/env python
"""Accuracy study: what each distillation method buys the demo's student, over several seeds.

The same student (the demo's RetinaNet on an ImageNet-initialised MobileNetV2), data and schedule
for every row: the plain student, and the student distilled with each method. One dense teacher
(a RetinaNet-MobileNetV2 trained longer: every method can use it, so these rows compare) and one
two-stage teacher (the demo's Faster R-CNN-MobileNetV2: the heterogeneous pair PKD is about) are
trained once and cached. Every (row, seed) is one ``tools/train_net.py`` run with ``SEED`` set;
it is evaluated with COCO box AP on ``pkd_demo_test`` (a split used for nothing else). Each
method keeps its published loss weights; the few settings that are not published (see
``SETTINGS_NOTE``) were chosen on ``pkd_demo_val``, never on the reported split.

Prints one table (AP/AP50/AP75 mean ± std over seeds, and the paired gain over the plain student
with the same seed) and writes JSON. Finished runs are found again and not re-trained, so an
interrupted study resumes where it stopped.

  .venv/bin/python benchmarks/accuracy.py                 # 3 seeds, every row (~90 min, 2 cores)
  .venv/bin/python benchmarks/accuracy.py --quick         # 1 seed, 3 rows, short schedule
  .venv/bin/python benchmarks/accuracy.py --seeds 0,1,2,3,4 --rows baseline,dense/PKD

The gains need the baseline row in the same table. On a machine with more cores, rows can run
as separate processes at once (``OMP_NUM_THREADS`` splitting the cores; a teacher is trained by
the first process that needs it, so start the processes that share one after it exists), then
``--collect`` prints the table of everything they trained.
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

from pkd.data import DEMO_TEST, register_demo_datasets
from pkd.demo import DEMO_CONFIGS, REPO, RESULTS_FILE, box_ap, train_cached, train_teacher

METRICS = ("AP", "AP50", "AP75")
# At the end of training (metrics.json's last record: medians over the last 20 iterations): the
# student's own RetinaNet losses, and the sum of the weighted distillation terms.
LOSSES = ("det_loss", "kd_loss")
DETECTION_LOSSES = ("loss_cls", "loss_box_reg")
STUDENT = os.path.join(DEMO_CONFIGS, "RetinaNet-MobileNetV2.yaml")
DISTILL = os.path.join(DEMO_CONFIGS, "PKD-RetinaNet-MobileNetV2.yaml")
# name: (config, folder under --teachers); the folders `make demo` trains the same configs into,
# so the study and the demo share their teachers (each is cached with its configuration's stamp).
TEACHERS = {
    "dense": (os.path.join(DEMO_CONFIGS, "RetinaNet-MobileNetV2-teacher.yaml"), "retina_teacher"),
    "two-stage": (os.path.join(DEMO_CONFIGS, "FasterRCNN-MobileNetV2-teacher.yaml"), "teacher"),
}
# Loss settings of each method (on top of DISTILL); published weights (see README, METHODS):
# PKD 10 for one-stage pairs, 6 with an R-CNN teacher; FGD's RetinaNet recipe; PGD's ATSS-style
# values for an anchor-based student; RM 4, PFI 1.5. MSE has no published weight: 1.
METHODS = {
    "PKD": {"dense": ["MODEL.DISTILL.LOSSES", "['PKD']", "MODEL.DISTILL.PKD.WEIGHT", "10.0"],
            "two-stage": ["MODEL.DISTILL.LOSSES", "['PKD']", "MODEL.DISTILL.PKD.WEIGHT", "6.0"]},
    "MSE": ["MODEL.DISTILL.LOSSES", "['MSE']", "MODEL.DISTILL.MSE.WEIGHT", "1.0"],
    "FGD": ["MODEL.DISTILL.LOSSES", "['FGD']"],
    "PGD": ["MODEL.DISTILL.LOSSES", "['PGD']", "MODEL.DISTILL.PGD.TOPK", "9",
            "MODEL.DISTILL.PGD.ALPHA", "0.08", "MODEL.DISTILL.PGD.BETA", "0.04",
            "MODEL.DISTILL.PGD.GAMMA", "0.128"],
    "RM+PFI": ["MODEL.DISTILL.LOSSES", "['RM', 'PFI']"],
    "PKD+RM": ["MODEL.DISTILL.LOSSES", "['PKD', 'RM']", "MODEL.DISTILL.PKD.WEIGHT", "10.0"],
    # RM and PFI one at a time (same weights): which of the two costs RM+PFI its AP75.
    "RM": ["MODEL.DISTILL.LOSSES", "['RM']"],
    "PFI": ["MODEL.DISTILL.LOSSES", "['PFI']"],
}
ROWS = ["baseline"] + [f"dense/{m}" for m in METHODS if m not in ("RM", "PFI")] + [
    f"two-stage/{m}" for m in ("PKD", "MSE", "FGD")
]
# Not in the default study; run with --rows.
DIAGNOSTIC_ROWS = ["dense/RM", "dense/PFI"]
QUICK_ROWS = ["baseline", "two-stage/PKD", "two-stage/MSE"]  # need only the demo's teacher
SETTINGS_NOTE = (
    "published loss weights; no inheriting (every row starts from the same ImageNet student); "
    "teachers trained once; evaluation on pkd_demo_test"
)


def row_overrides(row: str, teacher_weights: Dict[str, str]) -> List[str]:
    """Config overrides (on top of DISTILL) of a study row, e.g. ``dense/PKD``."""
    teacher, method = row.split("/")
    settings = METHODS[method]
    if isinstance(settings, dict):
        settings = settings[teacher]
    return [
        "MODEL.DISTILL.TEACHER.CONFIG", TEACHERS[teacher][0],
        "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights[teacher],
        "MODEL.DISTILL.INHERIT", "False",
        *settings,
    ]


def summarize(results: Dict[str, Dict[int, Dict[str, float]]]) -> List[Dict]:
    """Per row: mean and sample std over seeds of each metric, and the paired gain over the
    baseline on the seeds both have.

    Args:
        results: {row: {seed: {"AP": .., "AP50": .., "AP75": ..}}}; without "baseline", no gains.
    """
    baseline = results.get("baseline", {})
    summary = []
    for row in sorted(results, key=lambda r: r != "baseline"):  # the baseline's row first
        by_seed = results[row]
        seeds = sorted(by_seed)
        entry = {"row": row, "seeds": seeds}
        for metric in LOSSES:
            if all(metric in by_seed[s] for s in seeds):
                entry[metric] = _stats([by_seed[s][metric] for s in seeds])
        for metric in METRICS:
            values = [by_seed[s][metric] for s in seeds]
            entry[metric] = _stats(values)
            paired = [s for s in seeds if s in baseline]
            if row != "baseline" and paired:
                gains = [by_seed[s][metric] - baseline[s][metric] for s in paired]
                entry[f"gain_{metric}"] = _stats(gains)
        summary.append(entry)
    return summary


def _stats(values: Sequence[float]) -> Dict:
    return {
        "values": list(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def format_table(summary: Sequence[Dict]) -> str:
    lines = [
        f"{'row':<18} {'seeds':>5} {'AP':>12} {'AP50':>12} {'AP75':>12} {'gain AP (paired)':>18}"
        f" {'det loss':>9} {'KD loss':>8}",
        "-" * 100,
    ]
    for entry in summary:
        cells = [f"{entry[m]['mean']:6.1f} ± {entry[m]['std']:3.1f}" for m in METRICS]
        gain = entry.get("gain_AP")
        gain_text = f"{gain['mean']:+6.1f} ± {gain['std']:3.1f}" if gain else "-"
        losses = [f"{entry[m]['mean']:.3f}" if m in entry else "-" for m in LOSSES]
        lines.append(
            f"{entry['row']:<18} {len(entry['seeds']):>5} {cells[0]:>12} {cells[1]:>12} "
            f"{cells[2]:>12} {gain_text:>18} {losses[0]:>9} {losses[1]:>8}"
        )
    return "\n".join(lines).replace("± nan", "     ")


def run_study(
    rows: Sequence[str], seeds: Sequence[int], output: str, teachers_root: str,
    opts: Sequence[str] = (),
) -> Dict[str, Dict[int, Dict[str, float]]]:
    """Trains (or finds) every (row, seed), in the order of ``rows``, and returns their box AP on
    DEMO_TEST; the teachers the rows need are trained (or found) first, under ``teachers_root``."""
    register_demo_datasets()
    test = ["DATASETS.TEST", f"('{DEMO_TEST}',)"]
    needed = {row.split("/")[0] for row in rows if row != "baseline"}
    teacher_weights = {
        name: train_teacher(config, os.path.join(teachers_root, folder))["weights"]
        for name, (config, folder) in TEACHERS.items() if name in needed
    }
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    for row in rows:
        config = STUDENT if row == "baseline" else DISTILL
        extra = [] if row == "baseline" else row_overrides(row, teacher_weights)
        for seed in seeds:
            out = run_dir(output, row, seed)
            train_cached(config, out, [*extra, *test, "SEED", str(seed), *opts])
            results.setdefault(row, {})[seed] = run_results(out)
    return results


def run_results(run: str) -> Dict[str, float]:
    """A finished run's box AP (METRICS) and, from its metrics.json, its final LOSSES."""
    last: Dict[str, float] = {}
    with open(os.path.join(run, "metrics.json")) as f:
        for line in f:
            record = json.loads(line)
            if DETECTION_LOSSES[0] in record:
                last = record
    kd_terms = [v for k, v in last.items()
                if k.startswith("loss_") and k not in DETECTION_LOSSES and k != "loss_kd_idle"]
    return {**{m: v for m, v in box_ap(run).items() if m in METRICS},
            "det_loss": sum(last[k] for k in DETECTION_LOSSES),
            "kd_loss": sum(kd_terms)}


def run_dir(output: str, row: str, seed: int) -> str:
    return os.path.join(output, row.replace("/", "_"), f"seed{seed}")


def collect(rows: Sequence[str], seeds: Sequence[int], output: str):
    """The box AP of every (row, seed) already trained under ``output``, training nothing: to
    print the table of runs made by several study processes at once (each with its own --rows),
    or again later. Exits naming the runs that have no results."""
    missing = [run_dir(output, r, s) for r in rows for s in seeds
               if not os.path.isfile(os.path.join(run_dir(output, r, s), RESULTS_FILE))]
    if missing:
        raise SystemExit("No results yet (run the study without --collect first) in:\n  "
                         + "\n  ".join(missing))
    return {row: {seed: run_results(run_dir(output, row, seed)) for seed in seeds} for row in rows}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"rows to run, of {ROWS} (default: all) and {DIAGNOSTIC_ROWS}")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 seed, rows {QUICK_ROWS}, 30 student iterations: a smoke test")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: the table of the runs already in --output")
    parser.add_argument("--output", default=os.path.join(REPO, "output", "accuracy"))
    parser.add_argument("--teachers", default=os.path.join(REPO, "output", "demo"),
                        help="where the teachers are trained (or found): `make demo`'s folder")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                       "accuracy.json"))
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS) - set(DIAGNOSTIC_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {ROWS + DIAGNOSTIC_ROWS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    opts: List[str] = []
    output = args.output
    if args.quick:
        rows, seeds, output = QUICK_ROWS, seeds[:1], os.path.join(output, "quick")
        opts = ["SOLVER.MAX_ITER", "30", "SOLVER.STEPS", "(20, 25)", "SOLVER.WARMUP_ITERS", "10"]
    start = time.perf_counter()
    if args.collect:
        results = collect(rows, seeds, output)
    else:
        results = run_study(rows, seeds, output, args.teachers, opts)
    summary = summarize(results)
    table = format_table(summary)
    seconds = time.perf_counter() - start
    print(f"\nAccuracy study: box AP on {DEMO_TEST}, {len(seeds)} seed(s), {seconds:.0f} s\n{table}")
    teachers = {
        name: {m: box_ap(os.path.join(args.teachers, folder))[m] for m in METRICS}
        for name, (_, folder) in TEACHERS.items()
        if os.path.isfile(os.path.join(args.teachers, folder, RESULTS_FILE))
    }
    for name, ap in teachers.items():
        print(f"teacher {name}: " + " ".join(f"{m} {v:.1f}" for m, v in ap.items()))
    print(f"({SETTINGS_NOTE})")
    report = {"command": " ".join(["benchmarks/accuracy.py", *(argv or sys.argv[1:])]),
              "seeds": seeds, "quick": args.quick, "settings": SETTINGS_NOTE,
              "seconds": seconds, "teachers": teachers, "rows": summary}
    if not args.quick:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"written to {os.path.relpath(args.json, REPO)}")
    return report


if __name__ == "__main__":
    main()
