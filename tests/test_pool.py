"""ServerPool: sessions with every PBX, reconnect with backoff, one log line per outage."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from amiworker.ami.connection import Connection
from amiworker.ami.message import Message
from amiworker.ami.pool import ServerPool
from amiworker.backoff import exponential, full_jitter
from amiworker.settings import ServerSettings
from amiworker.sim.pbx import FakePBX
from tests.test_connection import CALL_EVENTS, SECRET, ScriptedPBX, _free_port
from tests.waiting import wait_for


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    host: str = "127.0.0.1"
    username: str = "amiuser"
    secret: SecretStr | str = SECRET
    auth: str = "md5"
    events: str = "on"
    tls: bool = False
    tls_ca_file: Path | None = None


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [full_jitter(attempt, 0.5, 30.0, rng) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.9 and min(delays) < ceiling * 0.1  # full jitter
    assert full_jitter(10_000, 0.5, 30.0, rng) <= 30.0  # no overflow


def test_exponential_backoff_is_capped_and_never_overflows() -> None:
    assert [exponential(n, 1.0, 10.0) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert exponential(-3, 1.0, 10.0) == 1.0  # "no failure yet" is the minimum
    # A handler retried for ever, a store away for a month: a float, never an OverflowError.
    assert exponential(10**9, 1.0, 3600.0) == 3600.0


async def test_pool_connects_to_every_pbx_and_routes_events_by_name() -> None:
    seen: list[tuple[str, str, bool]] = []
    async with ScriptedPBX() as pbx1, ScriptedPBX() as pbx2, asyncio.timeout(10):
        pool = ServerPool(
            [Server("pbx1", pbx1.port), Server("pbx2", pbx2.port, secret=SecretStr(SECRET))],
            on_event=lambda name, m, own: seen.append((name, m.name, own)),
        )
        async with pool:
            await pool.wait_connected(5)
            status = pool.status()
            assert set(status) == {"pbx1", "pbx2"}
            for entry in status.values():
                assert entry["connected"] and entry["ami_version"] == "11.0.0"
                assert entry["reconnects"] == 0 and entry["last_error"] is None
                assert entry["since"] is not None and entry["since"] <= time.time()
            conn = pool.connection("pbx2")
            assert isinstance(conn, Connection) and conn.name == "pbx2"
            assert (await conn.action("Ping")).ok
            await pbx2.broadcast(CALL_EVENTS[0].raw)
            await wait_for(lambda: ("pbx2", CALL_EVENTS[0].name, False) in seen, what="the event")
            assert ("pbx1", "FullyBooted", False) in seen
            with pytest.raises(KeyError, match=r"pbx3.*pbx1, pbx2"):
                pool.connection("pbx3")
        # stop() logged off politely
        assert pbx1.actions("Logoff") and pbx2.actions("Logoff")
        assert pool.connection("pbx1") is None


async def test_pool_reconnects_after_a_drop_with_one_lost_and_one_back_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="amiworker")
    async with ScriptedPBX() as pbx, asyncio.timeout(10):
        pool = ServerPool([Server("pbx1", pbx.port)], reconnect_min=0.2, reconnect_max=2.0)
        async with pool:
            await pool.wait_connected(5)
            first = pool.connection("pbx1")
            dropped = time.monotonic()
            pbx.drop()
            await wait_for(
                lambda: bool(pool.status()["pbx1"]["reconnects"] == 1 and pool.connection("pbx1")),
                timeout=3,
                what="the session back",
            )
            # The first retry waits uniform(0, reconnect_min); login takes a few ms.
            assert time.monotonic() - dropped < 0.2 + 0.5
            assert pool.connection("pbx1") is not first
            assert len(lines(caplog, "AMI session lost: closed by the PBX")) == 1
            back = lines(caplog, "AMI session back after")
            assert len(back) == 1 and "pbx1" in back[0] and "AMI 11.0.0" in back[0]
        assert len(lines(caplog, "AMI session lost")) == 1  # stop() is not a loss


async def test_pool_waits_for_a_pbx_that_is_down_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="amiworker")
    port = _free_port()
    async with asyncio.timeout(10):
        pool = ServerPool([Server("pbx1", port)], reconnect_min=0.05, reconnect_max=0.2)
        async with pool:
            with pytest.raises(
                TimeoutError, match=r"pbx1 \(127\.0\.0\.1:\d+\).*connection refused"
            ):
                await pool.wait_connected(0.5)
            status = pool.status()["pbx1"]
            assert not status["connected"] and "refused" in (status["last_error"] or "")
            assert pool.connection("pbx1") is None
            async with ScriptedPBX(port=port):
                await pool.wait_connected(3)
        retrying = lines(caplog, "retrying with backoff")
        assert len(retrying) == 1 and "pbx1" in retrying[0] and "connection refused" in retrying[0]
        assert len(lines(caplog, "AMI session open after")) == 1


async def test_wrong_credentials_are_logged_once_and_retried_slowly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with ScriptedPBX() as pbx, asyncio.timeout(10):
        pbx.login_failure_delay = 0.0
        pbx.secret = "something else"
        pool = ServerPool([Server("pbx1", pbx.port)], reconnect_min=0.01, reconnect_max=0.3)
        async with pool:
            await wait_for(lambda: len(pbx.actions("Login")) >= 3, what="3 login attempts")
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "Authentication failed" in errors[0].getMessage()
            assert SECRET not in caplog.text
            status = pool.status()["pbx1"]
            assert not status["connected"] and "Authentication failed" in (
                status["last_error"] or ""
            )
            pbx.secret = SECRET  # the admin fixes manager.conf: no restart needed
            await pool.wait_connected(3)


async def test_pool_accepts_the_settings_model() -> None:
    async with ScriptedPBX() as pbx, asyncio.timeout(10):
        server = ServerSettings(
            name="pbx1",
            host="127.0.0.1",
            port=pbx.port,
            username="amiuser",
            secret=SecretStr(SECRET),
        )
        async with ServerPool([server]) as pool:
            await pool.wait_connected(5)
        assert SECRET not in repr(pool.status())


def test_pool_refuses_duplicate_names_and_a_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeated: pbx1"):
        ServerPool([Server("pbx1", 1), Server("pbx1", 2)])
    with pytest.raises(ValueError, match="pbx1: cannot load tls_ca_file"):
        ServerPool([Server("pbx1", 1, tls=True, tls_ca_file=tmp_path / "missing.pem")])


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


async def test_pool_speaks_tls_verified_by_the_ca_file(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    events: list[Message] = []
    async with ScriptedPBX(ssl=server_ssl) as pbx, asyncio.timeout(10):
        tls_server = Server("pbx1", pbx.port, tls=True, tls_ca_file=cert)
        async with ServerPool([tls_server], on_event=lambda n, m, own: events.append(m)) as pool:
            await pool.wait_connected(5)
            conn = pool.connection("pbx1")
            assert conn is not None and await conn.command("core show uptime")
        # Without the CA file the certificate is refused, with one clear reason.
        untrusted = ServerPool([Server("pbx1", pbx.port, tls=True)], reconnect_min=0.05)
        async with untrusted:
            with pytest.raises(TimeoutError, match=r"TLS handshake failed.*tls_ca_file"):
                await untrusted.wait_connected(0.5)


# -- against the simulated PBX -----------------------------------------------------------------


def sim_server(pbx: FakePBX) -> Server:
    return Server(pbx.name, pbx.port, username="admin", secret=SecretStr("secret"))


async def test_sim_pool_reconnects_after_drop_sessions(
    fake_pbx: FakePBX, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="amiworker")
    seen: list[tuple[str, Message]] = []
    pool = ServerPool(
        [sim_server(fake_pbx)],
        on_event=lambda name, m, own: seen.append((name, m)),
        reconnect_min=0.2,
        reconnect_max=2.0,
    )
    async with pool, asyncio.timeout(10):
        await pool.wait_connected(5)
        dropped = time.monotonic()
        await fake_pbx.drop_sessions()
        await wait_for(
            lambda: bool(pool.status()["pbx1"]["reconnects"] == 1 and pool.connection("pbx1")),
            what="the session back",
        )
        assert time.monotonic() - dropped < 0.2 + 0.5  # first retry: uniform(0, reconnect_min)
        assert len(lines(caplog, "AMI session lost")) == 1
        assert len(lines(caplog, "AMI session back after")) == 1
        before = len(seen)
        linkedid = await fake_pbx.start_call()
        await wait_for(
            lambda: any(m.get("Linkedid") == linkedid for _, m in seen[before:]),
            what="events of a call on the new session",
        )
        assert {name for name, _ in seen} == {"pbx1"}


async def test_sim_pool_detects_a_stalled_pbx_and_logs_one_line_each_way(
    fake_pbx: FakePBX, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="amiworker")
    pool = ServerPool(
        [sim_server(fake_pbx)],
        reconnect_min=0.05,
        reconnect_max=0.2,
        connect_timeout=0.3,
        ping_interval=0.2,
        ping_timeout=0.3,
    )
    async with pool, asyncio.timeout(10):
        await pool.wait_connected(5)
        fake_pbx.stall()
        await wait_for(lambda: bool(lines(caplog, "AMI session lost")), what="the loss")
        assert "no Ping reply within 0.3 s" in lines(caplog, "AMI session lost")[0]
        await wait_for(
            lambda: len(lines(caplog, "AMI attempt failed")) >= 2, what="failed attempts"
        )
        fake_pbx.resume()
        await pool.wait_connected(5)
        assert len(lines(caplog, "AMI session lost")) == 1
        assert len(lines(caplog, "AMI session back after")) == 1
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1  # the loss; each failed attempt is at debug
