"""The demo driver's pieces (the full `make demo` run is too long for the test suite)."""
import json
import os

import pytest

from pkd import demo

from pkd_testing import DEMO


@pytest.mark.parametrize("method,teacher_dir", [("PKD", "teacher"), ("MSE", "teacher"),
                                                ("FGD", "teacher"), ("RM-PFI", "retina_teacher"),
                                                ("PGD", "retina_teacher")])
def test_every_demo_method_has_a_config_and_a_teacher(method, teacher_dir, tmp_path):
    config = demo._method_config(method)
    assert os.path.dirname(config) == DEMO and config.endswith("-RetinaNet-MobileNetV2.yaml")
    teacher = demo._teacher_of(config, str(tmp_path))
    assert os.path.isfile(teacher["config"])
    assert teacher["output_dir"] == str(tmp_path / teacher_dir)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(SystemExit, match=r"No demo config for method 'XYZ'.*'PKD'"):
        demo._method_config("XYZ")


def _write_results(directory, ap):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, demo.RESULTS_FILE), "w") as f:
        json.dump({"bbox": {"AP": ap, "AP50": ap + 20, "AP75": ap - 2}}, f)
    return str(directory)


def test_table_has_a_row_per_model():
    rows = [
        {"name": "teacher", "seconds": 10.0, "bbox": {"AP": 50.0, "AP50": 70.0, "AP75": 55.0}},
        {"name": "student", "seconds": None, "bbox": {"AP": 20.25, "AP50": 40.0, "AP75": 18.0}},
    ]
    table = demo.format_table(rows).splitlines()
    assert len(table) == 4
    assert table[2].split()[-5:] == ["50.0", "70.0", "55.0", "-", "10"]
    assert table[3].split()[-5:] == ["20.2", "40.0", "18.0", "-", "-"]


def test_rows_over_seeds_give_mean_std_and_the_paired_gain(tmp_path):
    plain = [_write_results(tmp_path / f"plain{s}", ap) for s, ap in enumerate([10.0, 12.0, 14.0])]
    kd = [_write_results(tmp_path / f"kd{s}", ap) for s, ap in enumerate([13.0, 13.0, 18.0])]
    baseline = demo._student_row("plain", plain, [1.0, 2.0, 3.0])
    row = demo._student_row("kd", kd, [4.0, 5.0, 6.0], baseline)
    assert baseline["bbox"]["AP"] == 12.0 and baseline["std"]["AP"] == 2.0
    assert row["gain_AP"]["per_seed"] == [3.0, 1.0, 4.0]
    assert row["gain_AP"]["mean"] == pytest.approx(8 / 3)
    assert row["gain_AP"]["std"] == pytest.approx(((1 / 3) ** 2 + (5 / 3) ** 2 + (4 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    line = demo.format_table([baseline, row]).splitlines()[3].split()
    assert line[1:4] == ["14.7", "±", "2.9"] and line[-4:-1] == ["+2.7", "±", "1.5"]


def test_demo_ends_with_the_report_of_each_method(tiny_runs, tmp_path, capsys):
    distilled, baseline = tiny_runs  # laid out as the demo's output/demo/student{,_pkd}
    (tmp_path / "student_pkd").symlink_to(distilled)
    (tmp_path / "student").symlink_to(baseline)
    rows = [{"name": "teacher: x", "output_dir": "unused"},
            {"name": "student: S, no KD", "output_dir": str(tmp_path / "student")},
            {"name": "student: S + PKD", "output_dir": str(tmp_path / "student_pkd")},
            {"name": "  same, model_final.pth in plain Detectron2", "output_dir": "unused"}]
    (path,) = demo.write_reports(rows)
    assert path == str(tmp_path / "student_pkd" / "report.html") and os.path.isfile(path)
    page = open(path).read()
    assert f"baseline <code>{tmp_path / 'student'}</code>" in page
    assert "Distillation report (student: S + PKD vs no KD): " in capsys.readouterr().out
