"""The API reference (docs/api_reference.py, `make docs`) builds from the docstrings without a
single pdoc warning and documents the public API."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "api_reference.py"


def _build(out: Path, *modules: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    paths = [str(ROOT / "src"), *([str(pythonpath)] if pythonpath else []), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *modules], capture_output=True, text=True, env=env, timeout=300
    )


def test_reference_builds_without_warnings_and_documents_the_public_api(tmp_path):
    done = _build(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    top = (tmp_path / "asyncfl.html").read_text()
    anchors = set(re.findall(r'id="([\w.]+)"', top))
    for name in ["load_config", "simulate", "compare", "Result", "Result.plot", "FederatedData.from_dataset"]:
        assert name in anchors, name
    for page in ["api", "data/user", "plugins", "config", "models/custom", "algorithms/aggregators"]:
        assert (tmp_path / "asyncfl" / f"{page}.html").is_file(), page
    assert (tmp_path / "index.html").is_file()


def test_a_pdoc_warning_fails_the_build(tmp_path):
    (tmp_path / "broken_annotation.py").write_text('def f(x: "list[") -> None:\n    """An unparsable hint."""\n')
    done = _build(tmp_path / "out", "broken_annotation", pythonpath=tmp_path)
    assert done.returncode == 1
    assert "Error parsing type annotation list[ for broken_annotation.f" in done.stderr
