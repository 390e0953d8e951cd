"""tools/report_distill.py's page on a tiny run and its baseline, and the TensorBoard feature
pictures the same run wrote (VIS_PERIOD)."""
import base64
import io
import json
import re

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pkd.analysis.report import main as report_main
from pkd.analysis.report import read_metrics


def decoded_images(page):
    """Every picture the page references (all are embedded PNGs), as RGB arrays."""
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).convert("RGB"))
            for s in sources]


def not_blank(rgb):
    return len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1


def test_report_page_against_the_baseline(tiny_runs, tmp_path, capsys):
    distilled, baseline = tiny_runs
    path = report_main([str(distilled), "--baseline", str(baseline), "--out", str(tmp_path),
                        "--num-images", "2"])
    assert path == str(tmp_path / "report.html")
    assert f"Distillation report: {path}" in capsys.readouterr().out
    page = open(path).read()
    images = decoded_images(page)
    # curves (detection, KD terms, total, pcc, weight scale), one picture per pair, histograms
    assert len(images) == 5 + 4 + 1
    assert all(not_blank(rgb) for rgb in images)
    for level, stride in (("p3", 8), ("p6", 64)):
        title = f"student {level} (stride {stride}) &lt;- teacher {level} (stride {stride})"
        assert f'alt="{title}"' in page
    for curves in ["Detection losses", "Distillation terms", "Total loss", "Feature correlation",
                   "Distillation weight factor"]:
        assert f'alt="{curves}' in page
    assert "Box AP during training" not in page  # evaluated once: the table shows it
    assert "<th>baseline</th><th>&Delta;</th>" in page and "<td>AP</td>" in page
    assert "No check_distill.json in the run" in page
    for section in ["Box AP", "Training curves", "Feature maps at the final checkpoint",
                    "Per-channel correlation with the teacher"]:
        assert f"<h2>{section}</h2>" in page


def test_report_without_baseline_shows_the_set_up_check(tiny_runs, tmp_path):
    distilled, _ = tiny_runs
    check = {"sound": False, "failures": ["channel order: fed BGR ..."],
             "warnings": ["loss_pkd_p3: x"],
             "teacher": {"own_path": {"AP": 40.0}, "distiller_path": {"AP": 1.5},
                         "num_images": 8, "dataset": "pkd_squares"}}
    (tmp_path / "check_distill.json").write_text(json.dumps(check))
    for name in ("config.yaml", "model_final.pth", "metrics.json", "eval_results.json"):
        (tmp_path / name).symlink_to(distilled / name)
    page = open(report_main([str(tmp_path)])).read()
    assert "<b>NOT sound</b>" in page and "channel order: fed BGR" in page
    assert "<th>baseline</th>" not in page
    assert len(decoded_images(page)) == 5 + 4 + 1


def test_metrics_keep_the_last_value_of_a_repeated_iteration(tmp_path):
    lines = [{"iteration": 0, "loss_cls": 3.0}, {"iteration": 1, "loss_cls": 2.0},
             {"iteration": 1, "loss_cls": 1.5, "kd/pcc_p3": 0.2}, {"iteration": 2, "loss_cls": 1.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    metrics = read_metrics(str(tmp_path))
    assert metrics == {"loss_cls": [(0, 3.0), (1, 1.5), (2, 1.0)], "kd/pcc_p3": [(1, 0.2)]}


def test_tensorboard_shows_the_feature_pictures(tiny_runs):
    distilled, _ = tiny_runs
    events = EventAccumulator(str(distilled), size_guidance={"images": 0})
    events.Reload()
    tags = [t for t in events.Tags()["images"] if t.startswith("kd/features_")]
    assert sorted(tags) == [f"kd/features_p{i}" for i in (3, 4, 5, 6)]
    assert [e.step for e in events.Images("kd/features_p3")] == [0, 2]  # VIS_PERIOD 2 of 4
    picture = events.Images("kd/features_p3")[0]
    rgb = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
    assert not_blank(rgb) and rgb.shape[0] > 100
