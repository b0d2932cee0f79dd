"""What a user sees when they get something wrong: one clear line, the right exit status.

Each case runs the real ``amiworker`` entry point as a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amiworker.devstack.embedded_mongo import EmbeddedMongo, free_port
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for

AMI_SECRET = "s3cret-ami-Pa55"
MONGO_PASSWORD = "m0ngo-Pa55word"


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amiworker.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def servers(port: int, secret: str = AMI_SECRET) -> str:
    return json.dumps(
        [{"name": "pbx1", "host": "127.0.0.1", "port": port, "username": "admin", "secret": secret}]
    )


def cli_env(workdir: Path, port: int, mongo_uri: str | None = None) -> dict[str, str]:
    """The environment of an ``amiworker`` run against one PBX on ``port``, with the
    quiet handlers of :func:`workdir`."""
    env = {
        "AMIWORKER_SERVERS": servers(port),
        "AMIWORKER_HANDLERS": "quiet",
        "AMIWORKER_APP_DIR": str(workdir / "app"),
    }
    if mongo_uri is not None:
        env["AMIWORKER_MONGO_URI"] = mongo_uri
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory: no .env, no handlers package."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "quiet.py").write_text("def UserEventHandler(ctx, event):\n    pass\n")
    return tmp_path


class Running:
    """``amiworker`` in the background, its output collected in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log = cwd / "out.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "amiworker.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=cwd,
            )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def background(workdir: Path) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for item in started:
        if item.process.poll() is None:
            item.process.kill()
            item.process.wait()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--workers", "abc"], {}, "invalid setting workers"),
        (["--workers", "0"], {}, "invalid setting workers"),
        ([], {"AMIWORKER_SERVERS": "[{"}, "servers"),
        ([], {"AMIWORKER_SERVERS": '[{"name": "a", "host": "h"}]'}, "servers.0"),
        ([], {"AMIWORKER_SERVERS": "[]"}, "no PBX configured"),
        ([], {"AMIWORKER_RACE": "sometimes"}, "invalid setting race"),
        ([], {"AMIWORKER_MONGO_URI": "http://x"}, "invalid setting mongo_uri"),
        # An unescaped password: refused as a setting, and never quoted back.
        ([], {"AMIWORKER_MONGO_URI": "mongodb://app:Lq/%@x@db1"}, "percent-encode"),
        (["--config", "missing.toml"], {}, "missing.toml"),
    ],
)
def test_bad_settings_exit_2_with_one_line_per_problem(
    workdir: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    env = {"AMIWORKER_SERVERS": servers(5038), **env}
    result = run(*args, env=env, cwd=workdir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    # One line per problem, each naming the setting.
    assert all(line.startswith("amiworker: ") for line in lines), result.stderr
    assert any(expected in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    assert "Lq/" not in result.stderr


def test_a_secret_in_bad_settings_is_never_echoed(workdir: Path) -> None:
    env = {"AMIWORKER_SERVERS": servers(5038).replace('"port": 5038', '"port": "x"')}
    result = run(env=env, cwd=workdir)
    assert result.returncode == 2
    assert AMI_SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("nosuchmodule", None, "No module named 'nosuchmodule'"),
        ("broken", "def HangupHandler(ctx, event)\n", "SyntaxError"),
        ("raising", "raise RuntimeError('no database configured')\n", "no database configured"),
    ],
)
def test_a_handler_module_that_fails_to_import_stops_start_up(
    workdir: Path, module: str, source: str | None, expected: str
) -> None:
    if source is not None:
        (workdir / "app" / f"{module}.py").write_text(source)
    env = {
        "AMIWORKER_SERVERS": servers(5038),
        "AMIWORKER_HANDLERS": module,
        "AMIWORKER_APP_DIR": str(workdir / "app"),
    }
    result = run(env=env, cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert f"handler module '{module}' failed to import" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_spill_dir_stops_start_up_with_one_line(workdir: Path) -> None:
    (workdir / "a-file").write_text("")
    spill_dir = workdir / "a-file" / "spill"  # through a regular file: refused even to root
    env = {
        **cli_env(workdir, 5038),
        "AMIWORKER_SPILL_DIR": str(spill_dir),
    }
    result = run(env=env, cwd=workdir)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(spill_dir) in line and "spill_dir" in line and "Traceback" not in line


async def test_unreachable_mongodb_is_named_and_amiworker_keeps_reading(
    workdir: Path, background: list[Running]
) -> None:
    closed = free_port()
    uri = f"mongodb://amiworker:{MONGO_PASSWORD}@127.0.0.1:{closed}/?serverSelectionTimeoutMS=500"
    async with FakePBX(username="admin", secret=AMI_SECRET, port=0) as pbx:
        env = {
            **cli_env(workdir, pbx.port, uri),
            "AMIWORKER_CONNECT_TIMEOUT": "1",
        }
        fleet = Running([], env, workdir)
        background.append(fleet)
        await wait_for(lambda: "is unreachable" in fleet.output(), 30, "the MongoDB error line")
        # The AMI session is open all the same, and the worker is not restarting.
        await wait_for(lambda: pbx.sessions == 1, 10, "the worker's AMI session")
        assert fleet.process.poll() is None
        assert fleet.stop() == 0
    output = fleet.output()
    assert f"127.0.0.1:{closed}" in output
    assert "mongo_uri" in output
    assert MONGO_PASSWORD not in output
    assert AMI_SECRET not in output
    assert "Traceback" not in output
    assert "died" not in output

    result = run("check", env=env, cwd=workdir)
    assert result.returncode == 1
    assert "is unreachable" in result.stdout
    assert MONGO_PASSWORD not in result.stdout + result.stderr


async def test_unreachable_pbx_is_named_once_and_retried(
    workdir: Path, background: list[Running], mongo_server: EmbeddedMongo
) -> None:
    closed = free_port()
    env = {
        **cli_env(workdir, closed, mongo_server.uri),
        "AMIWORKER_DATABASE": "cli_unreachable_pbx",
        "AMIWORKER_RECONNECT_MIN": "0.05",
        "AMIWORKER_RECONNECT_MAX": "0.2",
    }
    fleet = Running([], env, workdir)
    background.append(fleet)
    await wait_for(lambda: f"127.0.0.1:{closed}" in fleet.output(), 30, "the PBX error line")
    started = time.monotonic()
    # Many attempts at this backoff, yet the failure is logged once per outage.
    await wait_for(lambda: time.monotonic() - started > 1.5, 5, "some reconnect attempts")
    assert fleet.stop() == 0
    output = fleet.output()
    failure_lines = [line for line in output.splitlines() if f"127.0.0.1:{closed}" in line]
    assert len(failure_lines) == 1, output
    assert "refused" in failure_lines[0]
    assert AMI_SECRET not in output

    result = run("check", env=env, cwd=workdir)
    assert result.returncode == 1
    assert "PBX pbx1" in result.stdout and "refused" in result.stdout


async def test_check_reports_versions_and_timestamps_with_secrets_masked(
    workdir: Path, mongo_server: EmbeddedMongo
) -> None:
    async with FakePBX(username="admin", secret=AMI_SECRET, port=0) as pbx:
        env = cli_env(workdir, pbx.port, mongo_server.uri)
        result = await _run_async("check", env=env, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "AMI 11.0.0, Asterisk 22" in result.stdout
    assert "events carry a Timestamp" in result.stdout
    assert AMI_SECRET not in result.stdout + result.stderr
    assert '"secret": "**********"' in result.stdout or "***" in result.stdout


async def test_check_fails_for_a_pbx_without_timestamps_unless_allowed(
    workdir: Path, mongo_server: EmbeddedMongo
) -> None:
    async with FakePBX(username="admin", secret=AMI_SECRET, port=0, timestamp_events=False) as pbx:
        env = cli_env(workdir, pbx.port, mongo_server.uri)
        refused = await _run_async("check", env=env, cwd=workdir)
        allowed = await _run_async(
            "check", env={**env, "AMIWORKER_ALLOW_NO_TIMESTAMPS": "true"}, cwd=workdir
        )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    (line,) = [line for line in refused.stdout.splitlines() if "no Timestamp" in line]
    assert line.startswith("FAIL") and "timestampevents=yes" in line
    assert "allow_no_timestamps" in line
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    (line,) = [line for line in allowed.stdout.splitlines() if "no Timestamp" in line]
    assert line.startswith("warn")


async def test_check_says_the_claim_mode_and_in_hedged_mode_compares_two_sessions(
    workdir: Path, mongo_server: EmbeddedMongo
) -> None:
    async with FakePBX(
        username="admin", secret=AMI_SECRET, port=0, calls_per_second=10, call_duration=0.2
    ) as pbx:
        env = {
            **cli_env(workdir, pbx.port, mongo_server.uri),
            "AMIWORKER_CLAIM_MODE": "hedged",
        }
        result = await _run_async("check", env=env, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "claim mode: hedged" in result.stdout
    (line,) = [line for line in result.stdout.splitlines() if "two sessions" in line]
    assert line.startswith("ok") and "see the same stream" in line
    compared = int(line.split("(")[1].split()[0])
    assert compared > 10


async def test_check_with_a_wrong_secret(workdir: Path, mongo_server: EmbeddedMongo) -> None:
    async with FakePBX(
        username="admin", secret="the-real-one", port=0, login_failure_delay=0.1
    ) as pbx:
        env = cli_env(workdir, pbx.port, mongo_server.uri)
        result = await _run_async("check", env=env, cwd=workdir)
    assert result.returncode == 1
    assert "Authentication failed" in result.stdout
    assert AMI_SECRET not in result.stdout + result.stderr


async def _run_async(
    *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the CLI while this test's event loop keeps serving the in-process FakePBX."""
    import asyncio

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amiworker.cli",
        *args,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(args), process.returncode, out.decode(), err.decode())
