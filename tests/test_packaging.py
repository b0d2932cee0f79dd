"""A wheel built from the source holds every part, and installs into a fresh venv.

Built from a copy of the tracked files only, as a clean clone would be: files
the working tree happens to hold (caches, a local venv) cannot hide a missing
package.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _clean_copy(target: Path) -> Path:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():
            destination = target / name.decode()
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read_bytes())
    return target


def test_the_wheel_holds_every_subpackage_and_installs(tmp_path: Path) -> None:
    source = _clean_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("amiworker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "amiworker").rglob("__init__.py"))
    assert len(packages) >= 6
    missing = [name for name in packages if name not in names]
    assert not missing
    # The capture sample_calls() reads, and the pytest plugin's entry point.
    assert "amiworker/testing/data/asterisk22-20-calls.txt" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[pytest11]" in declared and "amiworker.testing.pytest_plugin" in declared
    # The call board's page is package data: served from the installed package.
    page = [
        f"amiworker/ops/board/static/{name}" for name in ("index.html", "board.js", "board.css")
    ]
    assert not [name for name in page if name not in names]

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=600,
    )
    helped = subprocess.run(
        [str(env_dir / "bin" / "amiworker"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "events" in helped.stdout and "status" in helped.stdout
    imported = subprocess.run(
        [
            str(python),
            "-c",
            "from amiworker import HandlerContext, Message, Connection, EventQuery, Settings; "
            "from amiworker import AMIError, ConnectionFinished; print(Connection.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "amiworker.ami.connection"
    sampled = subprocess.run(
        [
            str(python),
            "-c",
            "from amiworker.testing import sample_calls; print(len(sample_calls(2)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.strip() == "70"  # read from the installed wheel's data
