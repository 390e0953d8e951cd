"""The speed benchmarks run end to end on small settings and write their JSON (the numbers
themselves are measured by running them, never asserted here; accuracy.py: test_benchmark_accuracy)."""
import json
import os
import subprocess
import sys

import pytest

from pkd_testing import REPO


def run_benchmark(script, tmp_path, *args, env=()):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", f"{script}.py"), *args,
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_export_latency(demo_datasets_dir, tmp_path):
    result, out = run_benchmark(
        "export_latency", tmp_path, "--random-weights", "--images", "2", "--rounds", "1",
        "--warmup", "1", env={"DETECTRON2_DATASETS": str(demo_datasets_dir)},
    )
    assert set(result["stats"]) == {"pytorch", "torchscript", "onnxruntime"}
    assert all(s["median_ms"] > 0 for s in result["stats"].values())
    assert "onnxruntime" in out


@pytest.mark.parametrize("script, args", [
    ("step_time", ["--preset", "tiny", "--skip-memory"]),
    ("loss_cost", []),
])
def test_speed_benchmark(script, args, tmp_path):
    result, out = run_benchmark(script, tmp_path, *args, "--rounds", "1", "--warmup", "0",
                                "--height", "64", "--width", "96")
    assert result and "wrote" in out
