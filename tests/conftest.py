"""Shared test configuration.

Fixtures that start real servers live in their own plugin modules so that each
concept (the MongoDB stand-in, the simulated PBX) has one home.
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.mongo_plugin",
    "tests.sim_plugin",
    "tests.log_plugin",
    "tests.fleet_plugin",
]

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True, scope="session")
def _state_home() -> Iterator[Path]:
    """Spills (spill_dir defaults to $XDG_STATE_HOME/amiworker/spill) go to a directory
    of this test session, for every worker the tests start, in process or not: never
    to the home directory, never shared with another run."""
    with tempfile.TemporaryDirectory(prefix="amiworker-state-") as state:
        previous = os.environ.get("XDG_STATE_HOME")
        os.environ["XDG_STATE_HOME"] = state
        try:
            yield Path(state)
        finally:
            if previous is None:
                del os.environ["XDG_STATE_HOME"]
            else:
                os.environ["XDG_STATE_HOME"] = previous
