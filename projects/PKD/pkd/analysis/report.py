"""``tools/report_distill.py``: what did distillation do? One self-contained HTML page (pictures
embedded as PNG) for a finished run, optionally against a baseline run (the same student trained
without distillation):

* the box AP table of both runs (``eval_results.json``, written by :func:`pkd.engine.main`);
* the set-up check, when ``tools/check_distill.py`` wrote ``check_distill.json`` into the run;
* training curves from ``metrics.json``: detection losses, each distillation term,
  ``kd/pcc_<level>``, ``kd/weight_scale`` (the baseline's dashed);
* per distilled level, teacher and student feature maps side by side on a few test images at the
  final checkpoint (:func:`pkd.analysis.feature_vis.render_feature_pair`, the TensorBoard
  pictures' renderer), the baseline student's beside them;
* per level, the histogram of the per-channel Pearson correlation with the teacher.

The model is rebuilt from the run's saved ``config.yaml``; ``model_final.pth`` is loaded into the
student, the teacher loads its own weights (named in that config; trailing overrides fix a path).
"""
import argparse
import base64
import datetime
import html
import io
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from detectron2.data import DatasetCatalog

from ..checkpoint import DistillCheckpointer
from ..engine import RESULTS_FILE, build_student_for_eval
from ..losses import pearson_per_channel
from ..meta_arch import DistillMetaArch
from .check import REPORT_FILE as CHECK_FILE
from .feature_vis import (
    FeatureColumn,
    figure_to_rgb,
    input_images_rgb,
    pair_title,
    render_feature_pair,
    render_pcc_histograms,
)
from ..run_config import load_config
from .inputs import build_distiller, test_dataset

__all__ = ["read_metrics", "write_report", "main", "REPORT_NAME"]

REPORT_NAME = "report.html"
CONFIG_NAME = "config.yaml"  # what Detectron2's default_setup saves into the output directory
FINAL_WEIGHTS = "model_final.pth"

Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(run_dir: str) -> Series:
    """{key: [(iteration, value), ...]} from ``metrics.json`` (Detectron2's JSONWriter), sorted by
    iteration; a resumed run's repeated iterations keep their last value."""
    path = os.path.join(run_dir, "metrics.json")
    values: Dict[str, Dict[int, float]] = defaultdict(dict)
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                iteration = record.pop("iteration", None)
                if iteration is None:
                    continue
                for key, value in record.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        values[key][int(iteration)] = float(value)
    return {k: sorted(v.items()) for k, v in values.items()}


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _png(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(rgb: np.ndarray, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(rgb)}">'


def _curve_groups(metrics: Series, kd_names: Sequence[str]) -> Dict[str, List[str]]:
    """Splits the metric keys into the page's curve panels. Distillation terms are the
    ``loss_<method>_<level>`` keys of the configured losses."""
    prefixes = tuple(f"loss_{n.lower()}_" for n in kd_names)
    groups = {
        "Detection losses (the student's own)": sorted(
            k for k in metrics
            if k.startswith("loss_") and not k.startswith(prefixes) and k != "loss_kd_idle"
        ),
        "Distillation terms (weighted, as optimised)": sorted(
            k for k in metrics if k.startswith(prefixes)
        ),
        "Total loss": ["total_loss"] if "total_loss" in metrics else [],
        "Feature correlation with the teacher (kd/pcc)": sorted(
            k for k in metrics if k.startswith("kd/pcc_")
        ),
        "Distillation weight factor (kd/weight_scale)": [
            k for k in ("kd/weight_scale",) if k in metrics
        ],
        # only a run that evaluated more than once has a curve (the table shows the last)
        "Box AP during training": [
            k for k in ("bbox/AP", "bbox/AP50") if len(metrics.get(k, ())) > 1
        ],
    }
    return {title: keys for title, keys in groups.items() if keys}


def plot_curves(
    title: str, keys: Sequence[str], run: Series, baseline: Optional[Series], last_iteration: int
) -> np.ndarray:
    """One panel: every key of ``run`` (solid) and the same key of ``baseline`` (dashed), on
    iterations 0..last_iteration (the same axis in every panel)."""
    figure = Figure(figsize=(6.4, 3.6), dpi=80)
    ax = figure.subplots()
    for i, key in enumerate(keys):
        colour = f"C{i % 10}"
        for series, style, suffix in ((run, "-", ""), (baseline, "--", " (baseline)")):
            if series is None or key not in series:
                continue
            x, y = zip(*series[key])
            ax.plot(x, y, style, color=colour, marker="o" if len(x) < 8 else None,
                    markersize=3, linewidth=1.4, label=key + suffix)
    ax.set_title(title, fontsize=11)
    ax.set_xlim(0, max(last_iteration, 1) * 1.02)
    ax.set_xlabel("iteration", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, ncol=2 if len(keys) > 4 else 1)
    figure.tight_layout()
    return figure_to_rgb(figure)


def _ap_rows(
    run: Optional[Dict], baseline: Optional[Dict]
) -> List[Tuple[str, Optional[float], Optional[float]]]:
    run_box = (run or {}).get("bbox", {})
    base_box = (baseline or {}).get("bbox", {})
    keys = list(run_box) + [k for k in base_box if k not in run_box]
    return [(k, run_box.get(k), base_box.get(k)) for k in keys]


def _fmt(value: Optional[float]) -> str:
    return "-" if not _number(value) else f"{value:.2f}"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def ap_table(run: Optional[Dict], baseline: Optional[Dict], has_baseline: bool) -> str:
    if run is None:
        return (f"<p class=note>No {RESULTS_FILE} in the run (it is written after the final "
                "evaluation).</p>")
    header = "<tr><th>metric</th><th>distilled</th>" + (
        "<th>baseline</th><th>&Delta;</th>" if has_baseline else "") + "</tr>"
    rows = []
    for key, a, b in _ap_rows(run, baseline):
        cells = f"<td>{html.escape(key)}</td><td>{_fmt(a)}</td>"
        if has_baseline:
            delta = a - b if _number(a) and _number(b) else None
            cls = ""
            if delta:
                cls = " class=up" if delta > 0 else " class=down"
            cells += f"<td>{_fmt(b)}</td><td{cls}>{'-' if delta is None else f'{delta:+.2f}'}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def check_summary(check: Optional[Dict]) -> str:
    if check is None:
        return (f"<p class=note>No {CHECK_FILE} in the run: <code>tools/check_distill.py "
                "--config-file CONFIG</code> writes it before training.</p>")
    verdict = "sound" if check.get("sound") else "NOT sound"
    t = check.get("teacher", {})
    items = [f"<li class=fail>{html.escape(m)}</li>" for m in check.get("failures", [])]
    items += [f"<li class=warn>{html.escape(m)}</li>" for m in check.get("warnings", [])]
    own = (t.get("own_path") or {}).get("AP")
    return (
        f"<p>Before training the set-up was <b>{verdict}</b>: teacher box AP "
        f"{_fmt(own)} through its own data path, {_fmt((t.get('distiller_path') or {}).get('AP'))} "
        f"through the distiller's, on {t.get('num_images', '?')} images of "
        f"{html.escape(str(t.get('dataset', '?')))}.</p>"
        + (f"<ul>{''.join(items)}</ul>" if items else "")
    )


@torch.no_grad()
def _backbone_features(model, batch) -> Tuple[Dict[str, torch.Tensor], Tuple[int, int]]:
    """A detector's own preprocessing and backbone: ({level: (N, C, H, W)}, padded (H, W))."""
    images = model.preprocess_image(batch).tensor
    return model.backbone(images), tuple(images.shape[-2:])


@torch.no_grad()
def feature_section(
    model: DistillMetaArch,
    baseline: Optional[torch.nn.Module],
    batch: List[Dict],
) -> Tuple[List[Tuple[str, np.ndarray]], np.ndarray]:
    """Per pair, the picture of the teacher's, the student's (and the baseline's) maps on
    ``batch``, and the per-channel Pearson histograms of all pairs."""
    student = model.student
    student_maps, padded = _backbone_features(student, batch)
    # as in training: the teacher's batch is padded to the student's
    teacher_maps = model.teacher.features(
        model.teacher.preprocess(batch, model.student_input_format, padded)
    )
    baseline_maps = _backbone_features(baseline, batch)[0] if baseline is not None else {}
    baseline_shapes = baseline.backbone.output_shape() if baseline is not None else {}
    s_shapes, t_shapes = student.backbone.output_shape(), model.teacher.output_shape()
    image_sizes = [tuple(x["image"].shape[-2:]) for x in batch]
    images = input_images_rgb(batch, model.student_input_format)
    pictures, distilled_r, baseline_r = [], [], []
    for s, t in model.feature_pairs:
        columns = [FeatureColumn(f"teacher {t}", teacher_maps[t], t_shapes[t].stride),
                   FeatureColumn(f"student {s} (KD)", student_maps[s], s_shapes[s].stride)]
        comparable = s in baseline_maps and baseline_shapes[s].channels == t_shapes[t].channels
        if s in baseline_maps:
            columns.append(
                FeatureColumn(f"baseline {s} (no KD)", baseline_maps[s], baseline_shapes[s].stride)
            )
        title = pair_title(s, t, s_shapes[s].stride, t_shapes[t].stride)
        pictures.append((title, render_feature_pair(title, columns, image_sizes, images)))
        same_channels = s_shapes[s].channels == t_shapes[t].channels
        distilled_r.append(
            pearson_per_channel(student_maps[s], teacher_maps[t]) if same_channels else None
        )
        baseline_r.append(
            pearson_per_channel(baseline_maps[s], teacher_maps[t]) if comparable else None
        )
    series = {"distilled": distilled_r}
    if baseline is not None:
        series["baseline (no KD)"] = baseline_r
    histograms = render_pcc_histograms([s for s, _ in model.feature_pairs], series)
    return pictures, histograms


def _load_final(model: torch.nn.Module, run_dir: str) -> str:
    path = os.path.join(run_dir, FINAL_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: the report reads a finished run.")
    DistillCheckpointer(model).load(path, checkpointables=[])
    return path


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 13px; } .note { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child { text-align: left; }
td.up { color: #1a7f37; font-weight: bold; } td.down { color: #c62828; font-weight: bold; }
li.fail { color: #c62828; white-space: pre-wrap; } li.warn { color: #a15c00; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .grid img { border: 1px solid #eee; }
figure { margin: 0 0 16px 0; } figcaption { font-size: 13px; color: #444; }
"""


def write_report(
    run_dir: str,
    baseline_dir: Optional[str] = None,
    out_dir: Optional[str] = None,
    num_images: int = 3,
    opts: Sequence[str] = (),
) -> str:
    """Writes ``report.html`` for ``run_dir`` into ``out_dir`` (default: ``run_dir``).

    Args:
        baseline_dir: a run of the same student without distillation (its ``config.yaml``,
            ``model_final.pth``, ``metrics.json``, ``eval_results.json``).
        num_images: test images drawn (and correlated) per level.
        opts: overrides of the run's config (``KEY VALUE`` / ``key=value``).

    Returns:
        the page's path.
    """
    cfg = load_config(os.path.join(run_dir, CONFIG_NAME), opts)
    model = build_distiller(cfg)
    weights = _load_final(model.student, run_dir)
    baseline = None
    if baseline_dir is not None:
        baseline_cfg = load_config(os.path.join(baseline_dir, CONFIG_NAME))
        baseline = build_student_for_eval(baseline_cfg).eval()
        _load_final(baseline, baseline_dir)
    name, mapper = test_dataset(cfg)
    batch = [mapper(dict(d)) for d in DatasetCatalog.get(name)[:num_images]]
    pictures, histograms = feature_section(model, baseline, batch)

    metrics = read_metrics(run_dir)
    baseline_metrics = read_metrics(baseline_dir) if baseline_dir else None
    last_iteration = max((points[-1][0] for points in metrics.values()), default=0)
    curves = [
        (title, plot_curves(title, keys, metrics, baseline_metrics, last_iteration))
        for title, keys in _curve_groups(metrics, list(model.distill_losses)).items()
    ]
    run_results = _read_json(os.path.join(run_dir, RESULTS_FILE))
    baseline_results = None
    if baseline_dir:
        baseline_results = _read_json(os.path.join(baseline_dir, RESULTS_FILE))

    pairs = ", ".join(f"{s} &larr; {t}" for s, t in model.feature_pairs)
    body = [
        "<h1>Distillation report</h1>",
        f"<p class=meta>run <code>{html.escape(os.path.abspath(run_dir))}</code>"
        + (f"<br>baseline <code>{html.escape(os.path.abspath(baseline_dir))}</code>"
           if baseline_dir else "")
        + f"<br>student {type(model.student).__name__}, "
        f"teacher {type(model.teacher.model).__name__} "
        f"(<code>{html.escape(str(model.teacher.weights))}</code>), losses "
        f"{', '.join(model.distill_losses)}, pairs {pairs}; final checkpoint "
        f"<code>{html.escape(weights)}</code>; "
        f"written {datetime.datetime.now():%Y-%m-%d %H:%M}</p>",
        "<h2>Box AP</h2>",
        ap_table(run_results, baseline_results, baseline_dir is not None),
        "<h2>Set-up check</h2>",
        check_summary(_read_json(os.path.join(run_dir, CHECK_FILE))),
        "<h2>Training curves</h2>",
        "<p class=note>From metrics.json (Detectron2 writes the median of the last 20 "
        "iterations every 20 iterations). kd/pcc is the mean per-channel Pearson correlation of "
        "each student level with its teacher level on the training batch: it should rise as the "
        "student imitates. Dashed: the baseline run.</p>",
        '<div class=grid>' + "".join(_img(rgb, title) for title, rgb in curves) + "</div>",
        "<h2>Feature maps at the final checkpoint</h2>",
        f"<p class=note>Channel-mean |x| of each level on the first {len(batch)} images of "
        f"{html.escape(name)}, each panel on its own colour scale (PKD compares the maps after "
        "standardising every channel, so the pattern matters, not the level). A distilled "
        "student's maps should look more like the teacher's than the baseline's do.</p>",
        "".join(f"<figure>{_img(rgb, title)}</figure>" for title, rgb in pictures),
        "<h2>Per-channel correlation with the teacher</h2>",
        f"<p class=note>For each channel of each student level, the Pearson correlation with the "
        f"same channel of its teacher level over the {len(batch)} images (positions and images "
        "pooled). Distillation moves the distribution to the right.</p>",
        _img(histograms, "per-channel Pearson correlation histograms"),
    ]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Distillation report</title>"
        f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, REPORT_NAME)
    with open(path, "w") as f:
        f.write(page)
    return path


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write one HTML page showing what distillation did in a finished run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""
Examples:

  tools/report_distill.py output/demo/student_pkd --baseline output/demo/student
  tools/report_distill.py output/coco_pkd --out /tmp/report MODEL.DEVICE cpu
""",
    )
    parser.add_argument("run_dir", help="output directory of a distillation run")
    parser.add_argument("--baseline", help="output directory of the same student without KD")
    parser.add_argument("--out", help="folder for report.html (default: RUN_DIR)")
    parser.add_argument("--num-images", type=int, default=3, help="test images per picture")
    parser.add_argument("opts", nargs="*", default=[],
                        help="overrides of the run's config: KEY VALUE (yacs) or key=value")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    # intermixed: the overrides may come before or after the options
    args = argument_parser().parse_intermixed_args(argv)
    path = write_report(args.run_dir, args.baseline, args.out, args.num_images, args.opts)
    print(f"Distillation report: {path}")
    return path
