"""The demo driver's pieces (the full `make demo` run is too long for the test suite)."""
import os

import pytest

from pkd import demo

from pkd_testing import DEMO


@pytest.mark.parametrize("method,teacher_dir", [("PKD", "teacher"), ("MSE", "teacher"),
                                                ("FGD", "teacher"), ("RM-PFI", "retina_teacher"),
                                                ("PGD", "retina_teacher")])
def test_every_demo_method_has_a_config_and_a_teacher(method, teacher_dir, tmp_path):
    config = demo._method_config(method)
    assert os.path.dirname(config) == DEMO
    teacher_config, weights = demo._teacher_of(config, str(tmp_path))
    assert os.path.isfile(teacher_config)
    assert weights == str(tmp_path / teacher_dir / "model_final.pth")


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(SystemExit, match=r"No demo config for method 'XYZ'.*'PKD'"):
        demo._method_config("XYZ")


def test_table_has_a_row_per_model():
    rows = [
        {"name": "teacher", "seconds": 10.0, "bbox": {"AP": 50.0, "AP50": 70.0, "AP75": 55.0}},
        {"name": "student", "seconds": None, "bbox": {"AP": 20.25, "AP50": 40.0, "AP75": 18.0}},
    ]
    table = demo.format_table(rows).splitlines()
    assert len(table) == 4
    assert table[2].split()[-4:] == ["50.0", "70.0", "55.0", "10"]
    assert table[3].split()[-4:] == ["20.2", "40.0", "18.0", "-"]


def test_demo_ends_with_the_report_of_each_method(tiny_runs, tmp_path, capsys):
    distilled, baseline = tiny_runs  # laid out as the demo's output/demo/student{,_pkd}
    (tmp_path / "student_pkd").symlink_to(distilled)
    (tmp_path / "student").symlink_to(baseline)
    (path,) = demo.write_reports(str(tmp_path), ["PKD"])
    assert path == str(tmp_path / "student_pkd" / "report.html") and os.path.isfile(path)
    page = open(path).read()
    assert f"baseline <code>{tmp_path / 'student'}</code>" in page
    assert "Distillation report (PKD vs no KD): " in capsys.readouterr().out
