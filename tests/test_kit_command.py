"""``amiworker test-handlers`` and the pytest plugin, run as a user runs them: processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AMIWORKER = [sys.executable, "-m", "amiworker.cli"]

NOT_IDEMPOTENT = """
async def HangupHandler(ctx, event):
    await ctx.db["counts"].update_one(
        {"_id": event["Linkedid"]}, {"$inc": {"hangups": 1}}, upsert=True)
"""


def amiworker(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMIWORKER_")}
    return subprocess.run(
        [*AMIWORKER, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def test_the_example_handlers_pass_and_the_table_says_so() -> None:
    done = amiworker("test-handlers", "handlers.calls")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("HANDLER"))
    assert lines[header].split() == [
        "HANDLER",
        "RUNS",
        "FAILURES",
        "IDEMPOTENT",
        "ORDER-INDEPENDENT",
    ]
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert rows == [
        ["handlers.calls.HangupHandler", "40", "0", "yes", "yes"],
        ["handlers.calls.NewchannelHandler", "40", "0", "yes", "yes"],
        ["handlers.calls.NewstateHandler", "40", "0", "yes", "yes"],
    ]
    assert lines[-1].startswith("PASS in ")
    assert done.stderr == ""


def test_a_hundred_calls_in_under_two_seconds() -> None:
    started = time.perf_counter()
    done = amiworker("test-handlers", "handlers.calls", "--calls", "100")
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "on 100 sample call(s): 3500 events, 600 with a handler" in done.stdout
    reported = float(done.stdout.splitlines()[-1].split()[2])
    print(f"\namiworker test-handlers handlers.calls --calls 100: {wall:.2f} s wall "
          f"(interpreter included), {reported:.2f} s reported by the command")  # fmt: skip
    # The target is 2 s on the 2-core development VM; the bound leaves room for
    # the other test suites it shares the cores with.
    assert wall < 6.0


def test_a_property_that_fails_exits_1_naming_handler_and_event(tmp_path: Path) -> None:
    (tmp_path / "counting.py").write_text(NOT_IDEMPOTENT)
    done = amiworker("test-handlers", "counting", "--app-dir", str(tmp_path), "--calls", "3")
    assert done.returncode == 1, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["counting.HangupHandler", "6", "0", "NO", "yes"] in rows
    assert "idempotent: NO" in done.stdout
    assert "handler counting.HangupHandler on Hangup #" in done.stdout
    assert "first differing document: counts {_id: " in done.stdout
    assert done.stdout.splitlines()[-1].startswith("FAIL in ")


def test_a_plain_handler_that_never_returns_fails_and_does_not_hold_the_command(
    tmp_path: Path,
) -> None:
    """Its runs fail at --handler-timeout; the command prints its report and exits
    without waiting for their threads (Python's exit would wait forever)."""
    (tmp_path / "stuck.py").write_text(
        "import threading\n\ndef HangupHandler(ctx, event):\n    threading.Event().wait()\n"
    )
    done = amiworker(
        "test-handlers", "stuck", "--app-dir", str(tmp_path), "--calls", "1",
        "--handler-timeout", "0.2",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert ["stuck.HangupHandler", "2", "2", "NO", "NO"] in [
        line.split() for line in done.stdout.splitlines()
    ]
    assert "did not finish within 0.2 s (its thread is abandoned" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("FAIL in ")
    assert "exiting without waiting for 2 plain handler run(s) abandoned" in done.stderr
    bad = amiworker("test-handlers", "stuck", "--app-dir", str(tmp_path), "--handler-timeout", "0")
    assert bad.returncode == 2 and "--handler-timeout must be more than 0" in bad.stderr


def test_the_handlers_setting_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "counting.py").write_text(NOT_IDEMPOTENT)
    done = amiworker("test-handlers", "--handlers", "counting", "--app-dir", str(tmp_path))
    assert done.returncode == 1 and "counting.HangupHandler" in done.stdout


def test_a_module_that_fails_to_import_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n")
    done = amiworker("test-handlers", "broken", "--app-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("amiworker: handler module 'broken' failed to import: ")
    assert "ModuleNotFoundError" in line and "broken.py:1" in line

    missing = amiworker("test-handlers", "nowhere_to_be_found", "--app-dir", str(tmp_path))
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    (tmp_path / "empty.py").write_text("X = 1\n")
    empty = amiworker("test-handlers", "empty", "--app-dir", str(tmp_path))
    assert empty.returncode == 2 and "nothing to test" in empty.stderr
    bad_flag = amiworker("test-handlers", "handlers.calls", "--calls", "0")
    assert bad_flag.returncode == 2 and "--calls must be 1 or more" in bad_flag.stderr


USER_HANDLERS = """
from amiworker import HandlerContext, Message


async def HangupHandler(ctx: HandlerContext, event: Message) -> None:
    await ctx.db["cdr"].update_one(
        {"_id": event["Uniqueid"]},
        {"$set": {"cause": event.get("Cause"), "server": ctx.server}},
        upsert=True,
    )
    if ctx.ami is not None:
        await ctx.ami.set_var(event["Channel"], "BILLED", "1")
"""

USER_TESTS = """
from amiworker.testing import make_event, sample_calls


def test_billing(amiworker_harness):
    amiworker_harness.run(sample_calls(2))
    cdr = amiworker_harness.documents("cdr")
    assert len(cdr) == 4 and {doc["cause"] for doc in cdr} == {"16"}
    assert len(amiworker_harness.ami.actions("Setvar")) == 4
    assert amiworker_harness.check_idempotent(sample_calls(2))
    assert amiworker_harness.check_order_independent(sample_calls(2))


def test_one_event(amiworker_harness):
    amiworker_harness.run([make_event("Hangup", Uniqueid="1.1", Channel="SIP/a-1", Cause="17")])
    assert amiworker_harness.find_one("cdr", {"_id": "1.1"})["cause"] == "17"


def test_async(amiworker_async_harness):
    import asyncio

    async def main():
        await amiworker_async_harness.run(sample_calls(1))
        return await amiworker_async_harness.documents("cdr")

    assert len(asyncio.run(main())) == 2
"""


def test_the_fixture_in_a_users_project(tmp_path: Path) -> None:
    """``def test_billing(amiworker_harness)`` with nothing but amiworker installed:
    the fixtures come from the pytest11 entry point, the modules from the ini option."""
    (tmp_path / "billing").mkdir()
    (tmp_path / "billing" / "__init__.py").write_text(USER_HANDLERS)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_billing.py").write_text(USER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\namiworker_handlers = billing\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIWORKER_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def readme_block(first_line: str) -> str:
    """The code block of the README that starts with ``first_line``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"```python\n{first_line}\n") + len("```python\n")
    return text[start : text.index("```", start)]


def test_the_readme_example_runs_as_printed(tmp_path: Path) -> None:
    """The README's billing module and its test, exactly as printed there."""
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "__init__.py").write_text("")
    (tmp_path / "handlers" / "billing.py").write_text(readme_block("# handlers/billing.py"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_billing.py").write_text(readme_block("# tests/test_billing.py"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMIWORKER_", "PYTEST_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:asyncio"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
