#!/usr/bin/env python
"""Step time and peak memory of distillation against its physical limit.

Builds one DistillMetaArch with PKD from a config (random weights, no download) and measures,
side by side in one run, on the same batch, through the model's own methods:

* ``student_step``: the plain student's training step, ``model.student`` (forward + backward +
  SGD step);
* ``teacher_preprocess`` / ``teacher_features``: ``model.teacher.preprocess`` and
  ``model.teacher.features`` (backbone+FPN under no_grad), timed separately inside one call;
* ``distill_step``: ``model``'s training step (forward + backward + SGD step);
* ``pkd_loss``: ``model.distillation_losses`` (the configured PKD loss), forward + backward, on
  the paired FPN maps that ``model.distill_inputs`` captured once;
* ``pcc``: the ``kd/pcc`` diagnostic (``channel_pearson`` over the pairs, read out as a float).

After warm-up the kinds run interleaved in rounds, so that machine noise hits all of them alike,
and medians are reported. The headline number is

    ratio = distill_step / (student_step + teacher_features)

whose physical limit is 1.0 (distillation cannot be cheaper than running both networks); the
target is <= 1.05. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset; on CPU
each kind runs in a fresh subprocess of this script (``--memory-probe KIND``) that reports its
peak RSS minus the RSS just before its steps.

    python benchmarks/step_time.py --preset tiny --rounds 2      # quick check
    python benchmarks/step_time.py                                 # RetinaNet-R50 <- Mask R-CNN R50
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from detectron2.utils.events import EventStorage

from pkd.losses import channel_pearson
from pkd.meta_arch import PCC_PERIOD

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
    minor_page_faults,
    noise_warning,
    publish,
    run_rounds,
    summarize,
    sync,
    train_step,
)

RATIO_TARGET = 1.05
NOISE_CHECKED = ("student_step", "teacher_features", "distill_step")
MEMORY_PROBE_KINDS = ("student_step", "teacher", "distill_step")
PROBE_STEPS = 2
PROBE_TAG = "MEMORY_PROBE "
MiB = 1024.0 * 1024.0


PRESETS = {
    "full": Preset(
        student_config="COCO-Detection/retinanet_R_50_FPN_3x.yaml",
        teacher_config="COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
        batch=2,
        height=512,
        width=683,
    ),
    "tiny": Preset(
        student_config=os.path.join(REPO, "configs", "Demo", "PKD-RetinaNet-R18.yaml"),
        teacher_config=None,
        batch=8,
        height=128,
        width=160,
    ),
}


# ----------------------------------------------------------------------------------------------
# The measured kinds: each callable runs one unit of work and returns {name: seconds}
# ----------------------------------------------------------------------------------------------


def teacher_forward(work: Workload) -> Runner:
    """The teacher's preprocessing and backbone+FPN forward (no_grad), timed separately."""
    teacher = work.model.teacher
    fmt, padded = work.model.student_input_format, work.padded_size

    def run() -> Dict[str, float]:
        sync(work.device)
        start = time.perf_counter()
        images = teacher.preprocess(work.batch, fmt, padded)
        sync(work.device)
        faults = minor_page_faults()
        middle = time.perf_counter()
        teacher.features(images)
        sync(work.device)
        end = time.perf_counter()
        work.page_faults.setdefault("teacher_features", []).append(minor_page_faults() - faults)
        return {"teacher_preprocess": middle - start, "teacher_features": end - middle}

    return run


def pkd_loss_step(work: Workload) -> Runner:
    """The configured PKD loss (weight included) over all pairs, forward + backward into the
    student maps, on the captured features."""
    captured = work.captured

    def run() -> Dict[str, float]:
        leaves = [s.clone().requires_grad_() for s in captured.student_features]
        inputs = dataclasses.replace(captured, student_features=leaves)
        sync(work.device)
        start = time.perf_counter()
        sum(work.model.distillation_losses(inputs)["PKD"].values()).backward()
        sync(work.device)
        return {"pkd_loss": time.perf_counter() - start}

    return run


def pcc_diagnostic(work: Workload) -> Runner:
    """``channel_pearson`` over the pairs, each read out as a float as ``put_scalar`` does."""
    captured = work.captured

    def run() -> Dict[str, float]:
        sync(work.device)
        start = time.perf_counter()
        for s, t in zip(captured.student_features, captured.teacher_features):
            float(channel_pearson(s, t))
        return {"pcc": time.perf_counter() - start}

    return run


# Each kind's runner factory, in the order a round runs them.
KINDS: Dict[str, Callable[[Workload], Runner]] = {
    "student_step": lambda w: train_step(w, w.model.student, w.student_optimizer, "student_step"),
    "teacher": teacher_forward,
    "distill_step": lambda w: train_step(w, w.model, w.distill_optimizer, "distill_step"),
    "pkd_loss": pkd_loss_step,
    "pcc": pcc_diagnostic,
}
# Samples per round of the two cheap kinds (one sample of each would be mostly timer noise).
CALLS_PER_ROUND = {"pkd_loss": 5, "pcc": 5}


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------


def cuda_peak_mb(runner: Runner) -> float:
    """Peak CUDA memory one call allocates on top of what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MiB


def _proc_status_bytes(field_name: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc), so that the RSS baseline holds no free
    blocks that the steps would silently reuse."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Resets this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0), so that
    the peak afterwards reflects the steps rather than model building. False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(args) -> Dict[str, object]:
    """Builds what ``args.memory_probe`` needs, runs it PROBE_STEPS times and returns peak RSS
    minus the RSS just before the steps (MiB). Runs in a fresh process (see cpu_peaks_mb).

    The peak is VmHWM after a reset where Linux allows it. ``ru_maxrss`` is recorded too but is
    not used when VmHWM exists: after fork+exec it also carries the *parent's* RSS at fork
    time, which hides the steps' own peak whenever the parent is the larger process."""
    work = make_workload(args)
    runner = KINDS[args.memory_probe](work)
    work.batch  # built before the baseline is taken
    _release_free_heap()
    reset = _reset_peak_rss()
    before = _proc_status_bytes("VmRSS")
    with EventStorage(0):
        for _ in range(PROBE_STEPS):
            runner()
    hwm = _proc_status_bytes("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    source = "VmHWM" if (hwm is not None and reset) else "ru_maxrss"
    peak = hwm if source == "VmHWM" else ru_maxrss
    return {
        "kind": args.memory_probe,
        "peak_mb": (peak - before) / MiB,
        "rss_before_mb": before / MiB,
        "peak_rss_mb": peak / MiB,
        "peak_source": source,
        "ru_maxrss_mb": ru_maxrss / MiB,
        "steps": PROBE_STEPS,
    }


def cpu_peaks_mb(args) -> Dict[str, Dict[str, object]]:
    """Runs one ``--memory-probe`` subprocess per kind, one after the other."""
    results = {}
    for kind in MEMORY_PROBE_KINDS:
        print(f"  memory probe: {kind}", file=sys.stderr, flush=True)
        command = [
            sys.executable, os.path.abspath(__file__), "--memory-probe", kind,
            "--preset", args.preset, "--device", "cpu", "--seed", str(args.seed),
            "--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width),
            "--threads", str(torch.get_num_threads()),
            *(["--default-malloc"] if args.default_malloc else []),
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(PROBE_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"Memory probe {kind} failed:\n{proc.stderr[-3000:]}")
        results[kind] = json.loads(lines[-1][len(PROBE_TAG):])
    return results


def measure_memory(args, work: Workload, runners) -> Dict[str, Dict[str, object]]:
    """{kind: {"peak_mb": ..., ...}} for the student step, teacher forward and distill step."""
    if work.device.startswith("cuda"):
        return {k: {"peak_mb": cuda_peak_mb(runners[k])} for k in MEMORY_PROBE_KINDS}
    return cpu_peaks_mb(args)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def derived_numbers(stats: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The ratio to the physical limit (of the medians; of the minima as a check that is robust
    to load from other processes), the loss/diagnostic shares, and the part of the distill step
    not explained by its measured components."""
    medians = {k: v["median"] for k, v in stats.items()}
    distill = medians["distill_step"]
    limit = medians["student_step"] + medians["teacher_features"]
    pcc_per_step = medians["pcc"] / PCC_PERIOD  # computed on one step in PCC_PERIOD
    parts = limit + medians["teacher_preprocess"] + medians["pkd_loss"] + pcc_per_step
    mins = {k: v["min"] for k, v in stats.items()}
    return {
        "ratio": distill / limit,
        "ratio_of_minima": mins["distill_step"] / (mins["student_step"] + mins["teacher_features"]),
        "ratio_with_preprocess": distill / (limit + medians["teacher_preprocess"]),
        "pkd_loss_share": medians["pkd_loss"] / distill,
        "pcc_share": pcc_per_step / distill,
        "teacher_preprocess_share": medians["teacher_preprocess"] / distill,
        "unexplained_s": distill - parts,
        "unexplained_share": (distill - parts) / distill,
    }


ROWS = (
    ("student_step", "student step (fwd+bwd+SGD)", "student_step"),
    ("teacher_preprocess", "teacher preprocess", None),
    ("teacher_features", "teacher backbone+FPN (no_grad)", "teacher"),
    ("distill_step", "DistillMetaArch+PKD step", "distill_step"),
    ("pkd_loss", "PKD loss fwd+bwd (all pairs)", None),
    ("pcc", "kd/pcc diagnostic (all pairs)", None),
)


def format_report(result: Dict) -> str:
    """The human-readable table and headline numbers."""
    stats, memory, d = result["stats"], result["memory"], result["derived"]
    lines = [
        f"preset {result['preset']} | device {result['device']} | {result['threads']} threads | "
        f"malloc: {result['cpu_malloc']} | "
        f"batch {result['batch']} x {result['height']}x{result['width']} "
        f"(padded {result['padded_size'][0]}x{result['padded_size'][1]}) | "
        f"{result['rounds']} rounds after {result['warmup']} warm-up | "
        f"load average {result['load_average_1min_before']:.1f} before, "
        f"{result['load_average_1min']:.1f} after",
        f"{'kind':<32}{'median s':>10}{'min s':>10}{'n':>4}{'peak MB':>10}",
    ]
    for key, label, mem_key in ROWS:
        s = stats[key]
        peak = memory.get(mem_key, {}).get("peak_mb") if mem_key else None
        peak_text = f"{peak:10.1f}" if peak is not None else f"{'-':>10}"
        lines.append(f"{label:<32}{s['median']:10.4f}{s['min']:10.4f}{s['n']:4d}{peak_text}")
    verdict = "OK" if d["ratio"] <= RATIO_TARGET else "ABOVE TARGET"
    lines += [
        f"ratio distill_step / (student_step + teacher_features) = {d['ratio']:.3f} "
        f"(limit 1.0, target <= {RATIO_TARGET}: {verdict})",
        f"  with teacher preprocess in the denominator: {d['ratio_with_preprocess']:.3f}; "
        f"ratio of the minima: {d['ratio_of_minima']:.3f}",
        f"share of distill_step: PKD loss {100 * d['pkd_loss_share']:.2f} %, "
        f"kd/pcc {100 * d['pcc_share']:.2f} % (computed every {PCC_PERIOD} steps), "
        f"teacher preprocess {100 * d['teacher_preprocess_share']:.2f} %",
        f"distill_step minus all measured parts: {d['unexplained_s']:+.4f} s "
        f"({100 * d['unexplained_share']:+.2f} %)",
    ]
    faults = result["page_faults_median"]
    kinds = ("student_step", "teacher_features", "distill_step")
    lines.append(
        "minor page faults per call (median): " + ", ".join(f"{k} {faults[k]:.0f}" for k in kinds)
    )
    return "\n".join(lines + noise_warning(stats, NOISE_CHECKED))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--batch", type=int, help="images per batch (default: the preset's)")
    parser.add_argument("--height", type=int, help="image height (default: the preset's)")
    parser.add_argument("--width", type=int, help="image width (default: the preset's)")
    add_run_args(parser, rounds=5, warmup=2)
    parser.add_argument("--json", help="default: benchmarks/results/step_time_<preset>.json")
    parser.add_argument("--skip-memory", action="store_true", help="timings only")
    parser.add_argument("--memory-probe", choices=MEMORY_PROBE_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_run_args(parser, args)
    preset = PRESETS[args.preset]
    args.batch = args.batch or preset.batch
    args.height = args.height or preset.height
    args.width = args.width or preset.width
    default_json = os.path.join(REPO, "benchmarks", "results", f"step_time_{args.preset}.json")
    args.json = args.json or default_json
    return args


def make_workload(args) -> Workload:
    configure_process(args)
    cfg = build_cfg(PRESETS[args.preset], args.device)
    return Workload(cfg, args.batch, args.height, args.width, args.seed)


def benchmark(args) -> Dict:
    """The whole measurement; returns the JSON-ready result."""
    load_before = os.getloadavg()[0]
    work = make_workload(args)
    with EventStorage(0):
        runners = {kind: make(work) for kind, make in KINDS.items()}
        print(f"Benchmarking preset {args.preset} on {args.device} ...", file=sys.stderr)
        samples = run_rounds(runners, args.rounds, args.warmup, CALLS_PER_ROUND)
        memory = {} if args.skip_memory else measure_memory(args, work, runners)
    stats = summarize(samples)
    derived = derived_numbers(stats)
    captured = work.captured
    return {
        "preset": args.preset,
        "device": args.device,
        **environment(),
        "load_average_1min_before": load_before,
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
        "padded_size": list(work.padded_size),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seed": args.seed,
        "calls_per_round": {k: CALLS_PER_ROUND.get(k, 1) for k in KINDS},
        "student_config": PRESETS[args.preset].student_config,
        "teacher_config": work.cfg.MODEL.DISTILL.TEACHER.CONFIG,
        "feature_pairs": [
            {"student": s, "teacher": t, "shapes": [list(a.shape), list(b.shape)]}
            for (s, t), a, b in zip(
                work.model.feature_pairs, captured.student_features, captured.teacher_features
            )
        ],
        "timings": samples,
        "stats": stats,
        "medians": {k: v["median"] for k, v in stats.items()},
        "derived": derived,
        "ratio": derived["ratio"],
        "ratio_target": RATIO_TARGET,
        "memory": memory,
        "page_faults": work.page_faults,
        "page_faults_median": {k: statistics.median(v) for k, v in work.page_faults.items()},
        "last_total_losses": work.last_losses,
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        print(PROBE_TAG + json.dumps(memory_probe(args)), flush=True)
        return
    result = benchmark(args)
    publish(format_report(result), result, args.json)


if __name__ == "__main__":
    main()
