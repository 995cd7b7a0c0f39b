"""The package as a user installs it (issue 28): pyproject names every package folder, and a
built wheel, installed away from the clone, finds the bundled model and corpus and provides
no top-level `dashboard`. .ci/run does the full round (fresh venv, demo, report)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from check_wheel import wheel_problems  # noqa: E402


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_pyproject_lists_every_package_folder():
    config = _setuptools()
    folders = {name: Path(*name.split(".")) for name in ("routescope",)}
    folders |= {name: Path(path) for name, path in config["package-dir"].items()}
    on_disk = set()
    for name, root in folders.items():
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            on_disk.add(".".join((name, *rel)))
    listed = set(config["packages"])
    assert on_disk - listed == set(), "package folders missing from pyproject's [tool.setuptools] packages"
    assert listed - on_disk == {"routescope._data"}  # data/ is package data only, no __init__.py
    assert all(name.startswith("routescope") for name in listed)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clone built into a wheel and installed into a folder of its own (no deps)."""
    base = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", base, REPO], check=True, timeout=300)
    (wheel,) = base.glob("routescope-*.whl")
    assert wheel_problems(wheel) == []
    subprocess.run([*pip, "install", "--no-deps", "--target", base / "site", wheel], check=True, timeout=300)
    return base / "site"


def _python_in(site: Path, cwd: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "ROUTESCOPE_DATA"} | {
        "PYTHONPATH": str(site),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_an_installed_wheel_finds_the_bundled_data_and_has_no_top_level_dashboard(installed, tmp_path):
    code = (
        "import routescope, routescope.bundled as b, routescope.dashboard.queries;"
        "print(routescope.__file__); print(b.model_path()); print(b.corpus_path())"
    )
    proc = _python_in(installed, tmp_path, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, model, corpus = (Path(line) for line in proc.stdout.split())
    assert package.parent == installed / "routescope"  # the wheel's copy, not the clone's
    assert model == installed / "routescope" / "_data" / "model"
    assert corpus == installed / "routescope" / "_data" / "sample.jsonl"

    other = tmp_path / "elsewhere"
    (other / "model").mkdir(parents=True)
    (other / "model" / "config.json").write_text("{}")
    proc = _python_in(installed, tmp_path, code, ROUTESCOPE_DATA=str(other))
    assert proc.stdout.split()[1] == str(other / "model")  # $ROUTESCOPE_DATA still wins

    proc = _python_in(installed, tmp_path, "import dashboard")
    assert proc.returncode != 0 and "No module named 'dashboard'" in proc.stderr


def test_a_clone_finds_the_bundled_data_beside_the_package(monkeypatch):
    import routescope.bundled as bundled

    monkeypatch.delenv(bundled.DATA_ENV, raising=False)
    assert bundled.model_path() == REPO / "data" / "model"
    assert bundled.corpus_path() == REPO / "data" / "sample.jsonl"
