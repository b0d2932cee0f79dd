"""The call board's page in a real browser (Debian's Chromium, driven by Playwright).

Against a real installation: two simulated PBXs whose calls last ten minutes
unless hung up, ``amiworker --workers 2`` storing their events in nx-27017
(its handler fails on the Hangups of a caller named "Dead End", with
``max_attempts = 1``: they are dead at once), and ``amiworker board`` with no
PBX settings. The page is loaded once; everything after happens without a
reload. Playwright's own browser download does not work on these machines:
``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import re
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from pymongo import MongoClient

from amiworker.devstack.board_process import BoardProcess
from amiworker.devstack.embedded_mongo import EmbeddedMongo
from amiworker.devstack.processes import FleetProcess, SimulatorProcess
from tests.board_helpers import get_json
from tests.fleet_plugin import wait_connected

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = "<script>alert(1)</script>"
HANDLERS = textwrap.dedent(
    '''
    """Fails on the Hangups of the caller "Dead End"."""

    def HangupHandler(ctx, event):
        if event.get("CallerIDName") == "Dead End":
            raise ValueError("no such extension: the Dead End")
    '''
)


@dataclass
class Installation:
    board: BoardProcess
    simulators: dict[str, SimulatorProcess]
    db: Any
    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def originate(self, pbx: str, channel_id: str, caller: str) -> None:
        """A call on ``pbx`` whose Linkedid (and first Uniqueid) is ``channel_id``."""
        control = self.simulators[pbx].control()
        try:
            reply = control.action(
                "Originate",
                {
                    "Channel": "Local/100@test",
                    "Context": "test",
                    "Exten": "200",
                    "Priority": 1,
                    "CallerID": caller,
                    "ChannelId": channel_id,
                    "Async": "true",
                },
            )
            assert reply.name == "Success", reply.get("Message")
        finally:
            control.close()

    def hang_up(self, pbx: str, linkedid: str) -> None:
        """Hang up the call ``linkedid``: its first channel, by the name the board shows."""
        calls = get_json(self.board.url + "/api/calls")["calls"]
        (call,) = [c for c in calls if c["linkedid"] == linkedid]
        control = self.simulators[pbx].control()
        try:
            reply = control.action("Hangup", {"Channel": call["channels"][0]["channel"]})
            assert reply.name == "Success", reply.get("Message")
        finally:
            control.close()

    def wait_on_api(self, linkedid: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            calls = get_json(self.board.url + "/api/calls")["calls"]
            if any(c["linkedid"] == linkedid and len(c["channels"]) == 2 for c in calls):
                return
            assert time.monotonic() < deadline, f"{linkedid} never reached /api/calls"
            time.sleep(0.05)

    def assert_no_page_errors(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs


@pytest.fixture(scope="module")
def installation(
    mongo_server: EmbeddedMongo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Installation]:
    workdir = tmp_path_factory.mktemp("board-page")
    app_dir = workdir / "app"
    app_dir.mkdir()
    (app_dir / "boardhandlers.py").write_text(HANDLERS)
    database = f"t_page_{uuid.uuid4().hex[:12]}"
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server.uri, tz_aware=True)
    db = client[database]
    simulators = {f"pbx{i}": SimulatorProcess(f"pbx{i}", workdir, duration=600.0) for i in (1, 2)}
    fleet: FleetProcess | None = None
    board: BoardProcess | None = None
    try:
        for simulator in simulators.values():
            simulator.start()
        fleet = FleetProcess(
            workdir / "fleet",
            servers=[s.server_setting() for s in simulators.values()],
            mongo_uri=mongo_server.uri,
            database=database,
            workers=2,
            handlers=["boardhandlers"],
            app_dir=app_dir,
            # A long lease: no worker searches for the retried event during the test.
            extra_env={
                "AMIWORKER_HEARTBEAT_INTERVAL": "1",
                "AMIWORKER_LEASE": "600",
                "AMIWORKER_MAX_ATTEMPTS": "1",
            },
        ).start()
        wait_connected(db, 2, list(simulators))
        # The board knows no PBX and no AMI secret: it reads MongoDB only.
        board = BoardProcess(workdir / "board", mongo_uri=mongo_server.uri, database=database)
        board.start()
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(workdir / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1400, "height": 1000},
            )
            try:
                page = context.new_page()
                env = Installation(board, simulators, db, page)
                page.on("pageerror", lambda error: env.errors.append(f"pageerror: {error}"))
                page.on(
                    "console",
                    lambda message: (
                        env.errors.append(f"console: {message.text}")
                        if message.type == "error"
                        else None
                    ),
                )

                def on_dialog(dialog: Any) -> None:
                    env.dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", on_dialog)
                yield env
            finally:
                context.close()
    finally:
        if board is not None:
            assert board.stop() == 0, board.log_text()[-3000:]
        if fleet is not None:
            fleet.stop()
        for simulator in simulators.values():
            simulator.stop()
        client.drop_database(database)
        client.close()


def calls_row(env: Installation, linkedid: str) -> Any:
    return env.page.locator(f'#calls tr[data-linkedid="{linkedid}"]')


def test_long_calls_appear_with_their_channels(installation: Installation) -> None:
    env = installation
    env.originate("pbx1", "long-a", "Alice <2001>")
    env.originate("pbx2", "long-b", "Bob <2002>")
    env.wait_on_api("long-a")
    env.wait_on_api("long-b")
    env.page.goto(env.board.url + "/")
    rows = calls_row(env, "long-a")
    expect(rows).to_have_count(2, timeout=10_000)
    expect(rows.locator("td.channel")).to_have_text(
        ["Local/100@test-00000000;1", "Local/100@test-00000000;2"]
    )
    expect(rows.locator("td.state")).to_have_text(["Up", "Up"])
    expect(rows.locator("td.caller .cid-name")).to_have_text(["Alice", "Alice"])
    expect(rows.locator("td.caller .cid-num")).to_have_text(["2001", "2001"])
    expect(calls_row(env, "long-b").first.locator("td.pbx")).to_have_text("pbx2")
    # The duration ticks, on the page's own clock.
    duration = rows.first.locator("td.duration")
    first = duration.text_content()
    expect(duration).not_to_have_text(first or "", timeout=5_000)
    expect(env.page.locator("#live")).to_have_text("live (change stream)")
    env.assert_no_page_errors()


def test_a_call_started_after_the_page_loaded_appears_its_caller_as_text(
    installation: Installation,
) -> None:
    env = installation
    started = time.monotonic()
    env.originate("pbx1", "xss-1", XSS)
    rows = calls_row(env, "xss-1")
    expect(rows).to_have_count(2, timeout=15_000)
    print(f"\na call placed on the PBX is on the page after {time.monotonic() - started:.2f} s")
    # Rendered as text: the name is there, character for character, and no script ran.
    expect(rows.locator("td.caller .cid-name")).to_have_text([XSS, XSS])
    assert env.page.locator("#calls script").count() == 0
    assert env.page.locator("script").count() == 1  # board.js itself
    env.assert_no_page_errors()


def test_calls_hung_up_disappear(installation: Installation) -> None:
    env = installation
    expect(calls_row(env, "long-b")).to_have_count(2)
    started = time.monotonic()
    env.hang_up("pbx2", "long-b")
    expect(calls_row(env, "long-b")).to_have_count(0, timeout=15_000)
    print(f"\na call hung up leaves the page after {time.monotonic() - started:.2f} s")
    ended = env.page.locator('#ended tr[data-linkedid="long-b"]')
    expect(ended).to_have_count(1)
    expect(ended.locator("td").last).to_have_text("16 Normal Clearing")
    # The other calls are still there.
    expect(calls_row(env, "long-a")).to_have_count(2)
    env.assert_no_page_errors()


def test_retry_on_a_dead_event_makes_it_failed_and_due(installation: Installation) -> None:
    env = installation
    env.originate("pbx1", "dead-1", "Dead End <666>")
    env.wait_on_api("dead-1")
    env.hang_up("pbx1", "dead-1")
    dead = env.page.locator('#failures tr[data-state="dead"]')
    expect(dead).to_have_count(2, timeout=20_000)  # the Hangups of both channels
    expect(dead.first.locator("td.error")).to_have_text(
        re.compile(r"ValueError: no such extension: the Dead End \(\S*boardhandlers\.py:6\)")
    )
    row = dead.first
    event_id = row.get_attribute("data-id")
    assert event_id
    assert env.db.events.find_one({"_id": event_id})["state"] == "dead"
    row.locator("button.retry").click()
    # The board reads the failures again at once and pushes them: the row turns failed.
    expect(env.page.locator(f'#failures tr[data-id="{event_id}"]')).to_have_attribute(
        "data-state", "failed", timeout=10_000
    )
    expect(env.page.locator("#failures-message")).to_have_text("")
    doc = env.db.events.find_one({"_id": event_id})
    server_now = env.db.command("hello")["localTime"].replace(tzinfo=UTC)
    assert (doc["state"], doc["attempts"]) == ("failed", 0)
    assert isinstance(doc["retry_at"], datetime) and doc["retry_at"] <= server_now
    # Only that one: the other channel's Hangup is still dead, its Retry button there.
    expect(dead).to_have_count(1)
    expect(dead.locator("button.retry")).to_have_count(1)
    env.assert_no_page_errors()
