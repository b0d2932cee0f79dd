"""Secrets never show: not in logs, errors, reprs, status rows or command output.

A worker is configured with an AMI secret and a MongoDB password in the URI,
then driven through what makes software print its configuration: a PBX that
refuses the connection, PBXs that refuse the login (MD5 and plain, where the
secret itself goes over the wire), MongoDB unreachable, a graceful stop that
cannot be recorded, ``amiworker check``, an operator command and invalid
settings. Every log record (at DEBUG, every library included, before any
masking formatter) and every byte the commands print is searched for the
secrets, in the forms they are written in the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from amiworker.fleet.dispatch import load_handlers
from amiworker.fleet.worker import Worker
from amiworker.settings import Settings
from amiworker.sim.pbx import FakePBX
from tests.waiting import wait_for

StartPBX = Callable[..., Awaitable[FakePBX]]

AMI_SECRET = "ami-S3cret-7QxZp"
MONGO_PASSWORD = "Pw-9k!z@Lq/%"  # characters that must be escaped in a URI
MONGO_PASSWORD_IN_URI = quote(MONGO_PASSWORD, safe="")
UNESCAPED = "Pw-9k!z@Lq"  # a password with an @, not escaped in the URI
SECRETS = (AMI_SECRET, MONGO_PASSWORD, MONGO_PASSWORD_IN_URI, UNESCAPED)
HANDLERS = "async def UserEventHandler(ctx, event):\n    pass\n"


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows the secret {secret!r}:\n{text}"


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def mongo_uri(port: int) -> str:
    return f"mongodb://amiworker:{MONGO_PASSWORD_IN_URI}@127.0.0.1:{port}/?authSource=admin"


def servers(wrong_secret_pbx: FakePBX, down_port: int) -> list[dict[str, Any]]:
    """A PBX that is down, and one that refuses our secret, logged in to both ways."""
    common = {"host": "127.0.0.1", "username": "admin", "secret": AMI_SECRET}
    return [
        {"name": "pbx-down", "port": down_port, **common},
        {"name": "pbx-md5", "port": wrong_secret_pbx.port, "auth": "md5", **common},
        {"name": "pbx-plain", "port": wrong_secret_pbx.port, "auth": "plain", **common},
    ]


@pytest.fixture
async def wrong_secret_pbx(fake_pbx_factory: StartPBX) -> FakePBX:
    return await fake_pbx_factory(name="pbx1", secret="what-the-pbx-expects")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "quiet_handlers.py").write_text(HANDLERS)
    return tmp_path


def all_records_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as logged: message, arguments, and any traceback, unmasked."""
    formatter = logging.Formatter()
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
        if record.stack_info:
            parts.append(record.stack_info)
    return "\n".join(parts)


# -- a worker in this process: every log record, before any formatter masks it ---------------


@pytest.fixture
def restore_sys_path() -> Iterator[None]:
    before = list(sys.path)
    yield
    sys.path[:] = before
    sys.modules.pop("quiet_handlers", None)


async def test_a_worker_failing_everywhere_logs_no_secret(
    wrong_secret_pbx: FakePBX,
    app_dir: Path,
    caplog: pytest.LogCaptureFixture,
    restore_sys_path: None,
) -> None:
    caplog.set_level(logging.DEBUG)  # the root: pymongo, asyncio and the rest too
    settings = Settings.load(
        None,
        env_file=None,
        servers=servers(wrong_secret_pbx, refused_port()),
        mongo_uri=mongo_uri(refused_port()),
        database="secrets",
        handlers=["quiet_handlers"],
        app_dir=app_dir,
        connect_timeout=0.5,
        reconnect_min=0.05,
        reconnect_max=0.3,
        heartbeat_interval=0.2,
        lease=1.0,
        shutdown_timeout=1.0,
    )
    worker = Worker(settings, load_handlers(settings.handlers, settings.app_dir))
    task = asyncio.create_task(worker.run())

    def logged(text: str) -> int:
        return sum(text in record.getMessage() for record in caplog.records)

    try:
        async with asyncio.timeout(30):
            await wait_for(lambda: logged("refused the login") >= 2, what="both logins refused")
            await wait_for(lambda: logged("connection refused") >= 1, what="pbx-down refused")
            await wait_for(
                lambda: logged("MongoDB at mongodb://amiworker:***@") >= 1,
                timeout=10,
                what="MongoDB unreachable, its URI masked",
            )
            # Retried logins (the plain one sends the secret itself) are no different.
            await wait_for(
                lambda: logged("AMI attempt failed") >= 2, timeout=10, what="retried logins"
            )
            status = repr(worker.pool.status()) + repr(worker.heartbeat_info())
            objects = repr(settings) + repr(worker.store.__dict__) + repr(worker.pool.__dict__)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)  # the stop cannot be recorded: logged, no secret
    assert logged("MongoDB unreachable: the stop is not recorded there") == 1
    assert_no_secret(status, "the worker's status and heartbeat")
    assert_no_secret(objects, "a repr of the settings or store")
    assert_no_secret(all_records_text(caplog), "a log record")


# -- the commands, as an operator runs them: everything they print ------------------------------


def command_env(wrong_secret_pbx: FakePBX, mongo_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIWORKER_")}
    env.update(
        AMIWORKER_SERVERS=json.dumps(servers(wrong_secret_pbx, refused_port())),
        AMIWORKER_MONGO_URI=mongo_uri(mongo_port),
        AMIWORKER_HANDLERS="quiet_handlers",
        AMIWORKER_CONNECT_TIMEOUT="0.5",
        AMIWORKER_RECONNECT_MIN="0.05",
        AMIWORKER_RECONNECT_MAX="0.3",
        AMIWORKER_SHUTDOWN_TIMEOUT="1",
    )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def command(
    args: list[str], env: dict[str, str], cwd: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """``amiworker ARGS`` with stdout and stderr into one file; killed if still running."""
    output = cwd / "output.txt"
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "amiworker.cli", *args,
            env=env, cwd=cwd, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        yield process, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def run_command(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    async with command(args, env, cwd) as (process, output):
        code = await asyncio.wait_for(process.wait(), 60)
    return code, output.read_text()


async def test_the_fleet_at_debug_prints_no_secret(
    wrong_secret_pbx: FakePBX, app_dir: Path
) -> None:
    env = command_env(wrong_secret_pbx, refused_port(), AMIWORKER_LOG_LEVEL="DEBUG")
    async with command(["run", "--workers", "1"], env, app_dir) as (process, output):

        def printed(text: str) -> bool:
            return text in output.read_text()

        await wait_for(lambda: printed("refused the login"), timeout=60, what="a login refused")
        await wait_for(lambda: printed("connection refused"), timeout=30, what="pbx-down")
        await wait_for(
            lambda: printed("MongoDB at mongodb://amiworker:***@"), timeout=30, what="MongoDB"
        )
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    assert_no_secret(output.read_text(), "amiworker run --log-level DEBUG")


async def test_check_and_operator_commands_print_no_secret(
    wrong_secret_pbx: FakePBX, app_dir: Path
) -> None:
    env = command_env(wrong_secret_pbx, refused_port())
    code, printed = await run_command(["check"], env, app_dir)
    assert code == 1
    assert "PBX pbx-md5" in printed and "Authentication failed" in printed
    assert "PBX pbx-down" in printed and "connection refused" in printed
    assert "mongodb://amiworker:***@" in printed and '"secret": "***"' in printed
    assert_no_secret(printed, "amiworker check")

    code, printed = await run_command(["status"], env, app_dir)
    assert code == 1 and "mongodb://amiworker:***@" in printed
    assert_no_secret(printed, "amiworker status")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        # The password written unescaped: not a valid URI.
        ("AMIWORKER_MONGO_URI", f"mongodb://amiworker:{UNESCAPED}@127.0.0.1:1/"),
        # A servers list that is not valid JSON, the secret in it.
        ("AMIWORKER_SERVERS", f'[{{"name": "pbx1", "secret": "{AMI_SECRET}", }}'),
        # Valid JSON, an invalid server entry, the secret in it.
        ("AMIWORKER_SERVERS", f'[{{"name": "pbx1", "port": "x", "secret": "{AMI_SECRET}"}}]'),
    ],
    ids=["unescaped password", "servers not JSON", "invalid server entry"],  # no secret in ids
)
async def test_invalid_settings_holding_a_secret_are_reported_without_it(
    wrong_secret_pbx: FakePBX, app_dir: Path, setting: str, value: str
) -> None:
    env = command_env(wrong_secret_pbx, refused_port(), **{setting: value})
    code, printed = await run_command(["check"], env, app_dir)
    assert code != 0 and printed.strip()
    assert_no_secret(printed, f"amiworker check with a bad {setting}")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_with_quotes_and_backslashes_are_masked_in_both_formats(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret with ``"`` or ``\\`` is escaped by JSON encoding: it must be masked
    before, or the escaped form reaches the line in clear."""
    from amiworker import logs

    secrets = ['qu"ote-S3cret', "back\\slash-S3cret", 'both\\"-S3cret']
    for secret in secrets:
        logs.register_secret(secret)
    logs.configure("DEBUG", fmt, "w-test")
    log = logging.getLogger("amiworker.test")
    try:
        for secret in secrets:
            log.debug("login with %s failed", secret, extra={"server": f"pbx {secret}"})
            try:
                raise ValueError(f"refused {secret}")
            except ValueError:
                log.exception("while using %r", secret)
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert err.count("***") >= 3 * len(secrets)
    for line in err.splitlines():
        if fmt == "json" and line.startswith("{"):
            json.loads(line)  # still valid JSON
    for secret in secrets:
        for form in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]):
            assert form not in err, f"{form!r} in {err}"
