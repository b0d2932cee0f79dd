"""Shared test configuration.

Fixtures that start real servers live in their own plugin modules so that each
concept (the MongoDB stand-in, the simulated PBX) has one home.
"""

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
