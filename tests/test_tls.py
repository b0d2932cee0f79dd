"""AMI over TLS: ``tls = true`` with ``tls_ca_file``, against the simulator's TLS port.

Asterisk serves AMI over TLS on ``tlsbindport`` (manager.conf ``tlsenable``);
``FakePBX(ssl=...)`` (``--tls-cert``/``--tls-key`` as a process) does the same.
Certificates are made here with ``cryptography`` (a test dependency): a
self-signed one, as most PBXs have, and a small CA for the failure cases. A
certificate that cannot be trusted is one clear line naming the PBX and what
is wrong with the certificate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from amiworker.ami.connection import Connection
from amiworker.ami.errors import ConnectError
from amiworker.ami.message import Message
from amiworker.ami.pool import ServerPool
from amiworker.settings import ServerSettings
from amiworker.sim.pbx import FakePBX
from tests.sim_plugin import SimProcess
from tests.waiting import wait_for

StartPBX = Callable[..., Awaitable[FakePBX]]


@dataclass
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def issue(
    directory: Path,
    name: str,
    hosts: Sequence[str] = ("127.0.0.1",),
    *,
    issuer: Issued | None = None,
    ca: bool = False,
    valid_days: tuple[int, int] = (-1, 30),
) -> Issued:
    """A certificate for ``hosts``, signed by ``issuer`` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=valid_days[0]))
        .not_valid_after(now + timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=ca or issuer is None, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Issued(cert, key, cert_file, key_file)


@pytest.fixture
def self_signed(tmp_path: Path) -> Issued:
    """What most PBXs have: a self-signed certificate, its own trust anchor."""
    return issue(tmp_path, "pbx1-self-signed")


def tls_server(pbx: FakePBX, ca_file: Path | None, name: str = "pbx1") -> ServerSettings:
    return ServerSettings(
        name=name,
        host="127.0.0.1",
        port=pbx.port,
        username=pbx.username,
        secret=SecretStr(pbx.secret),
        tls=True,
        tls_ca_file=ca_file,
    )


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_pool_logs_in_over_tls_and_gets_every_event(
    fake_pbx_factory: StartPBX, self_signed: Issued
) -> None:
    pbx = await fake_pbx_factory(ssl=self_signed.server_context())
    seen: list[Message] = []
    pool = ServerPool(
        [tls_server(pbx, self_signed.cert_file)], on_event=lambda name, m, own: seen.append(m)
    )
    async with pool, asyncio.timeout(15):
        await pool.wait_connected(5)
        conn = pool.connection("pbx1")
        assert conn is not None and conn.ami_version == "11.0.0"
        assert (await conn.command("core show version"))[0].startswith("Asterisk 22.10.1")
        await pbx.start_call()
        await wait_for(
            lambda: (
                len(pbx.sent_events) >= 40
                and [m.raw for m in seen[-len(pbx.sent_events) :]] == pbx.sent_events
            ),
            timeout=10,
            what="every event of the call, byte for byte, over TLS",
        )
    # The port speaks nothing but TLS: a plain client gets no banner.
    with pytest.raises(ConnectError, match="no AMI banner within"):
        await Connection.open("127.0.0.1", pbx.port, "admin", "secret", timeout=0.5)


async def test_a_simulator_process_serves_tls_with_cert_and_key_flags(
    pbx_process_factory: Callable[..., Awaitable[SimProcess]], self_signed: Issued
) -> None:
    sim = await pbx_process_factory(
        "--tls-cert", str(self_signed.cert_file), "--tls-key", str(self_signed.key_file)
    )
    client = ssl.create_default_context(cafile=str(self_signed.cert_file))
    async with asyncio.timeout(15):
        conn = await Connection.open("127.0.0.1", sim.port, "admin", "secret", ssl=client)
        assert await conn.ping() >= 0
        await conn.logoff()


def test_a_simulator_process_with_a_missing_certificate_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing.pem"
    result = subprocess.run(
        [sys.executable, "-m", "amiworker.sim", "--port", "0", "--tls-cert", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load --tls-cert" in lines[0] and str(missing) in lines[0]


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("another CA", "self-signed certificate"),
        ("no CA file", "self-signed certificate"),
        ("expired", "certificate has expired"),
        ("for another host", "IP address mismatch"),
    ],
)
async def test_an_untrusted_certificate_is_one_clear_line_naming_the_pbx_and_the_problem(
    fake_pbx_factory: StartPBX,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
    problem: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="amiworker")
    authority = issue(tmp_path, "ca", (), ca=True)
    ca_file: Path | None = authority.cert_file
    if case == "another CA":
        served = issue(tmp_path, "pbx1")  # self-signed, while tls_ca_file is another CA
    elif case == "no CA file":
        served, ca_file = issue(tmp_path, "pbx1"), None  # the system's CAs only
    elif case == "expired":
        served = issue(tmp_path, "pbx1", issuer=authority, valid_days=(-9, -1))
    else:
        served = issue(tmp_path, "pbx1", ["pbx.example.org"], issuer=authority)
    pbx = await fake_pbx_factory(ssl=served.server_context())
    pool = ServerPool([tls_server(pbx, ca_file)], reconnect_min=0.05, reconnect_max=0.1)
    async with pool, asyncio.timeout(15):
        # Retried with backoff meanwhile (at debug): an admin may fix it without a restart.
        await wait_for(
            lambda: len([r for r in caplog.records if "AMI attempt failed" in r.getMessage()]) >= 2,
            what="two more attempts",
        )
        status = pool.status()["pbx1"]
    (line,) = warnings_and_errors(caplog)
    assert line.startswith(f"cannot connect to AMI at pbx1 (127.0.0.1:{pbx.port}): ")
    assert "TLS handshake failed: the PBX certificate is not trusted" in line
    assert problem in line and "tls_ca_file" in line
    assert not status["connected"] and problem in (status["last_error"] or "")


async def test_tls_to_a_plain_ami_port_names_the_tls_port(
    fake_pbx_factory: StartPBX, self_signed: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    plain = await fake_pbx_factory()
    pool = ServerPool([tls_server(plain, self_signed.cert_file)], reconnect_min=0.05)
    async with pool, asyncio.timeout(15):
        await wait_for(lambda: bool(warnings_and_errors(caplog)), what="the failure")
    (line,) = warnings_and_errors(caplog)
    assert "pbx1" in line and "TLS handshake failed" in line and "tlsbindport" in line
