"""pytest fixtures for handler tests, registered as a plugin by installing amiworker.

``amiworker_harness``
    a :class:`~amiworker.testing.blocking.SyncHarness`: blocking methods, for
    plain ``def test_...(amiworker_harness)`` tests; no asyncio plugin needed.
``amiworker_async_harness``
    a :class:`~amiworker.testing.harness.Harness`, for ``async def`` tests
    (pytest-asyncio, anyio...): ``await amiworker_async_harness.run(events)``.

Both use the handler modules of the ``amiworker_handlers`` ini option
(comma-separated), else of ``AMIWORKER_HANDLERS``, else ``handlers``,
imported from the ``amiworker_app_dir`` ini option, else ``AMIWORKER_APP_DIR``,
else the rootdir; ``.load("handlers.billing")`` picks others in a test. The
modules are imported when first needed, and ``sys.path`` is restored after
each test. The fixtures need mongomock-motor (``pip install
'amiworker[testing]'``); without it, only a test that uses one fails.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from amiworker.testing.blocking import SyncHarness
    from amiworker.testing.harness import Harness

__all__ = ["amiworker_async_harness", "amiworker_harness", "pytest_addoption"]

_HANDLERS_INI = "amiworker_handlers"
_APP_DIR_INI = "amiworker_app_dir"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _HANDLERS_INI,
        "amiworker: handler modules for the amiworker_harness fixtures, comma-separated "
        "(default: $AMIWORKER_HANDLERS, else handlers)",
        default="",
    )
    parser.addini(
        _APP_DIR_INI,
        "amiworker: directory the handler modules are imported from (default: "
        "$AMIWORKER_APP_DIR, else the rootdir)",
        default="",
    )


def _configured(config: pytest.Config) -> tuple[str, Path]:
    modules = str(config.getini(_HANDLERS_INI) or os.environ.get("AMIWORKER_HANDLERS") or "")
    app_dir = str(config.getini(_APP_DIR_INI) or os.environ.get("AMIWORKER_APP_DIR") or "")
    base = config.rootpath
    return modules or "handlers", (base / app_dir if app_dir else base)


@pytest.fixture
def amiworker_harness(request: pytest.FixtureRequest) -> Iterator[SyncHarness]:
    """A blocking harness on the configured handler modules (see the module doc)."""
    from amiworker.testing.blocking import SyncHarness

    modules, app_dir = _configured(request.config)
    path_before = list(sys.path)
    harness = SyncHarness(modules, app_dir=app_dir)
    try:
        yield harness
    finally:
        harness.close()
        sys.path[:] = path_before


@pytest.fixture
def amiworker_async_harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """An asynchronous harness on the configured handler modules (see the module doc)."""
    from amiworker.testing.harness import Harness

    modules, app_dir = _configured(request.config)
    path_before = list(sys.path)
    try:
        yield Harness(modules, app_dir=app_dir)
    finally:
        sys.path[:] = path_before
