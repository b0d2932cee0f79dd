"""pytest plugin: a real MongoDB wire-protocol server (nx-27017) for the test session.

Fixtures:

- ``mongo_server``: the session's :class:`EmbeddedMongo` (one process, started
  once, on a free loopback port). Tests that stop or kill a server start their
  own ``EmbeddedMongo`` instead of touching this one.
- ``mongo_uri``: its connection string.
- ``mongo_driver``: ``"pymongo"`` then ``"motor"``; tests using ``database``
  or ``store`` run once per driver.
- ``database_name``: a fresh database name for this test.
- ``database``: that database, opened with ``mongo_driver``; dropped afterwards.
- ``store``: an :class:`LockTable` on ``database`` as worker ``"worker-a"``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.fleet.locktable import LockTable
from amiworker.mongo import close_client, open_client

DRIVERS = ("pymongo", "motor")


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    server = EmbeddedMongo(tmp_path_factory.mktemp("nx-27017"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mongo_uri(mongo_server: EmbeddedMongo) -> str:
    return mongo_server.uri


@pytest.fixture(params=DRIVERS)
def mongo_driver(request: pytest.FixtureRequest) -> str:
    driver: str = request.param
    return driver


@pytest.fixture
def database_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def mongo_client(mongo_uri: str, mongo_driver: str) -> AsyncIterator[Any]:
    client = open_client(mongo_uri, mongo_driver, serverSelectionTimeoutMS=5000)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        await close_client(client)


@pytest.fixture
async def database(mongo_client: Any, database_name: str) -> AsyncIterator[Any]:
    db = mongo_client[database_name]
    try:
        yield db
    finally:
        await mongo_client.drop_database(database_name)


@pytest.fixture
def store(database: Any, mongo_uri: str) -> LockTable:
    return LockTable(database, "events", "worker-a", uri=mongo_uri)
