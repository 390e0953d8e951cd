"""benchmarks/score_vs_iou.py: the per-GT statistics, and the script on two finished tiny runs."""
import importlib.util
import json
import os

import pytest
import torch

from detectron2.data import DatasetCatalog

from pkd_testing import REPO

_spec = importlib.util.spec_from_file_location(
    "score_vs_iou_benchmark", os.path.join(REPO, "benchmarks", "score_vs_iou.py")
)
score_vs_iou = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(score_vs_iou)


def test_statistics_of_a_score_that_ranks_boxes_backwards():
    stats = score_vs_iou.gt_statistics(torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.6, 0.8, 0.9]))
    assert stats["best_iou"] == pytest.approx(0.9)
    assert stats["top_iou"] == pytest.approx(0.6)  # NMS would keep the worst box
    assert stats["top_at_75"] == 0.0
    assert stats["spearman"] == pytest.approx(-1.0)


def test_statistics_of_a_score_that_ranks_boxes_right():
    stats = score_vs_iou.gt_statistics(torch.tensor([0.2, 0.7, 0.4, 0.9]),
                                       torch.tensor([0.5, 0.8, 0.7, 0.95]))
    assert stats == pytest.approx({"best_iou": 0.95, "top_iou": 0.95, "top_at_75": 1.0,
                                   "spearman": 1.0})


def test_one_anchor_has_no_ranking():
    assert score_vs_iou.gt_statistics(torch.tensor([0.3]), torch.tensor([0.7])) is None


def test_script_on_a_distilled_and_a_plain_run(tiny_runs, squares, tmp_path, capsys):
    out = tmp_path / "score_vs_iou.json"
    score_vs_iou.main([*map(str, tiny_runs), "--num-images", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == [str(r) for r in tiny_runs]
    annotated = sum(len(r["annotations"]) for r in DatasetCatalog.get(squares)[:4])
    for row in rows:
        assert row["dataset"] == squares and 0 < row["gts"] <= annotated
        assert 0.0 <= row["top_iou"] <= row["best_iou"] <= 1.0
        assert 0.0 <= row["top_at_75"] <= 1.0 and -1.0 <= row["spearman"] <= 1.0
    assert "Spearman" in capsys.readouterr().out
