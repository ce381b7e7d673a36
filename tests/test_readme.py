"""The README's tour, run for real: each command of its ```console blocks, against a stack started
the way `corral up` starts it, must print what the README shows after it.

How a block is read:
- a line starting `$ ` is a command (a trailing `# comment` is dropped); the lines after it, up to the
  next command or the end of the block, are what it prints;
- `…` stands for any text within a line, and a line that is only `…` for any number of lines;
- a run of spaces, or of one table-border character, matches a run of any length, so a cell whose
  content varies may widen its column;
- task ids (32 hex digits), dates, times, the server's port and every number `corral top` prints
  (timings and rates) are compared by their shape; a task id in a command means the task the README
  showed with that id earlier;
- before a command that shows what the monitor judged (`corral alerts`, `corral top`) the test waits until
  the monitor has counted every task end and evaluated its rules once more, and every service runs the
  policy now current (the monitor may have rolled it back).

`make run` is checked by its own test: the demo with fewer tasks, its figures compared by shape.
A command that cannot run here is in NOT_RUN, with the reason; any other command the test does not
know fails it, so a new line in the tour cannot go unchecked.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from contracts import subjects
from services.client import Client
from shared.config import Settings
from shared.policy import read_policy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COLUMNS = "110"  # the terminal width the README's outputs were printed at
CORE = ("guard", "budget", "executor", "breaker", "monitor", "worker-research", "worker-coding", "worker-writing")
NOT_RUN = {
    "docker": "needs a Docker engine; tests/test_deploy.py checks compose.yaml, tests/test_tracing.py the export",
    "CORRAL_OTLP_ENDPOINT=": "needs a collector (Jaeger); tests/test_tracing.py receives one task's spans over OTLP",
}
VARYING = ("top",)  # commands whose figures are timings and rates: their numbers are compared by shape
MONITOR_VIEWS = ("alerts", "top")  # commands that show what the monitor judged: it is given time to judge
POLICY_VERSION = {"corral-guard": lambda data: data["policy_version"],
                  "corral-executor": lambda data: data["policy"]["version"],
                  "corral-monitor": lambda data: data["policy"]["version"]}
TOUR_S = 240  # the tour takes less (200 s on a busy machine); its budget figures must not straddle an hour,
# a new budget window


@dataclass
class Command:
    line: str  # as the README shows it
    shown: list[str] = field(default_factory=list)  # what the README says it prints

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.line, comments=True)


def tour_commands(text: str) -> list[Command]:
    """Every command of the README's ```console blocks, in order, with the output shown after it."""
    commands: list[Command] = []
    for block in re.findall(r"^```console\n(.*?)^```$", text, flags=re.M | re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                commands.append(Command(line[2:]))
            elif not commands:
                raise AssertionError(f"a ```console block starts with output, not a command: {line!r}")
            else:
                commands[-1].shown.append(line)
    return commands


# --- comparing an output with what the README shows -------------------------------------------

TASK_ID = r"[0-9a-f]{32}"
SHAPES = [  # (what the README shows, what it matches), applied to each shown line before escaping the rest
    (re.compile(TASK_ID), f"({TASK_ID})"),
    (re.compile(r"\d{4}-\d{2}-\d{2}(?:T\d{2})?"), r"\\d{4}-\\d{2}-\\d{2}(?:T\\d{2})?"),  # a day, or an hour
    (re.compile(r"\b\d{2}:\d{2}(?::\d{2})?\b"), r"\\d{2}:\\d{2}(?::\\d{2})?"),
    (re.compile(r"127\.0\.0\.1:\d+"), r"127\\.0\\.0\\.1:\\d+"),
]
_TOKEN = re.compile("|".join(f"(?:{shape.pattern})" for shape, _ in SHAPES) + r"|…| +|(?P<border>[━─═])(?P=border)*")


def line_pattern(line: str, numbers_vary: bool = False) -> str:
    out, at = [], 0
    for match in _TOKEN.finditer(line):
        out.append(_literal(line[at:match.start()], numbers_vary))
        token = match.group(0)
        if token == "…":
            out.append(".*?")
        elif token.startswith(" "):
            out.append(" +")
        elif match.group("border"):
            out.append(re.escape(token[0]) + "+")
        else:
            out.append(next(shape.sub(repl, token) for shape, repl in SHAPES if shape.fullmatch(token)))
        at = match.end()
    out.append(_literal(line[at:], numbers_vary))
    return "".join(out)


def _literal(text: str, numbers_vary: bool) -> str:
    if not numbers_vary:
        return re.escape(text)
    return r"\d[\d,.]*".join(re.escape(part) for part in re.split(r"\d[\d,.]*", text))


def output_pattern(shown: list[str], numbers_vary: bool = False) -> re.Pattern[str]:
    lines = _trimmed([line.rstrip() for line in shown])
    parts = ["(?:.*\n)*?" if line.strip() == "…" else line_pattern(line, numbers_vary) + "\n" for line in lines]
    return re.compile("".join(parts))


def _trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def normalised(output: str) -> str:
    lines = _trimmed([line.rstrip() for line in output.splitlines()])
    return "".join(f"{line}\n" for line in lines)


def assert_shows(command: Command, output: str, ids: dict[str, str], numbers_vary: bool = False) -> None:
    """The output matches what the README shows; the ids the README shows are bound to the real ones."""
    match = output_pattern(command.shown, numbers_vary).fullmatch(normalised(output))
    assert match, (f"`{command.line}` printed something other than the README shows.\n"
                   f"--- README\n" + "\n".join(command.shown) + f"\n--- printed\n{output}")
    for shown, real in zip(re.findall(TASK_ID, "\n".join(command.shown)), match.groups()):
        ids.setdefault(shown, real)


# --- the parser and the matcher can fail -------------------------------------------------------


def test_a_shown_output_matches_only_what_it_shows():
    command = Command("corral x", ["completed 7c33a085098343ed958a98fd7eeb21bc in 1 attempt(s), 12+109 tokens",
                                   "…", "┏━━━━━━┳━━━━━━━━━━━━━━━━┓", "│ user   │ hour 2026-11-27T02 │ 10,000 │"])
    ids: dict[str, str] = {}
    printed = "completed 0123456789abcdef0123456789abcdef in 1 attempt(s), 12+109 tokens\nsome\ntext\n" \
              "┏━━━━━━┳━━━━━━━━━━━━━━━━━━━━━┓\n│ user │ hour 2026-12-01T21      │ 10,000 │\n"
    assert_shows(command, printed, ids)
    assert ids == {"7c33a085098343ed958a98fd7eeb21bc": "0123456789abcdef0123456789abcdef"}
    with pytest.raises(AssertionError, match="other than the README shows"):
        assert_shows(command, printed.replace("12+109", "12+110"), {})
    with pytest.raises(AssertionError, match="other than the README shows"):
        assert_shows(command, printed.replace("10,000", "1,000"), {})
    with pytest.raises(AssertionError, match="other than the README shows"):
        assert_shows(command, printed.replace("┳", "┯"), {})


def test_the_tour_is_found_in_the_readme():
    commands = [" ".join(c.argv[:2]) for c in tour_commands(README.read_text())]
    for wanted in ("make run", "corral up", "corral submit", "corral status", "corral budget", "corral cost",
                   "corral breakers", "corral policy", "corral alerts", "corral top", "corral service"):
        assert wanted in commands, f"the README's tour lacks `{wanted}`"


# --- running it --------------------------------------------------------------------------------


def _corral() -> list[str]:
    script = Path(sys.executable).with_name("corral")
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CORRAL_CONFIG", "CORRAL_NATS_URL")}
    return {**env, "COLUMNS": COLUMNS, "PYTHONUNBUFFERED": "1", **changes}


def test_the_readme_demo_output_is_what_corral_demo_prints(tmp_path):
    (demo,) = [c for c in tour_commands(README.read_text()) if c.argv == ["make", "run"]]
    # `make run` is `corral demo` with 300 tasks; fewer tell the same story, sooner. Figures vary by run.
    argv = [*_corral(), "demo", "--tasks", "60", "--users", "12", "--rate", "60", "--data-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_shows(demo, done.stdout, {}, numbers_vary=True)


class Tour:
    """The processes the tour starts, and what it learnt on the way."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = _env()
        self.url = ""
        self.ids: dict[str, str] = {}  # task id shown in the README -> the real one
        self.background: list[subprocess.Popen[str]] = []

    def run(self, command: Command) -> None:
        argv = command.argv
        if argv[0] == "export":
            name, _, _ = argv[1].partition("=")
            assert name == "CORRAL_NATS_URL", f"the tour exports {name}; the test knows only CORRAL_NATS_URL"
            self.env[name] = self.url
        elif argv == ["corral", "up"]:
            self.up(command)
        elif argv[:2] == ["corral", "service"]:
            self.scale_out(command)
        elif argv[0] == "corral":
            self.corral(command)
        else:
            raise AssertionError(f"the test does not know how to run `{command.line}`: add it, or to NOT_RUN")

    def up(self, command: Command) -> None:
        proc = subprocess.Popen([*_corral(), "up"], cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.background.append(proc)
        printed = [proc.stdout.readline() for _ in range(len(_trimmed(list(command.shown))))]
        assert_shows(command, "".join(printed), self.ids)
        self.url = re.search(r"nats://127\.0\.0\.1:\d+", printed[0]).group(0)
        # As the README's reader: the operator's commands find its key under .data/auth of where `corral up`
        # ran; here they run from the repository (the tour's paths), so they are told where it is.
        self.operator = str(self.tmp / ".data" / "auth" / "operator.nk")
        self.replicas_become(dict.fromkeys(CORE, 1))

    def scale_out(self, command: Command) -> None:
        assert not command.shown, "a service prints only logs; the README shows none"
        argv = command.argv
        label = f"worker-{argv[argv.index('--agent') + 1]}" if argv[2] == "worker" else argv[2]
        before = self.replicas()
        proc = subprocess.Popen([*_corral(), *argv[1:]], cwd=self.tmp, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=(self.tmp / f"{label}.log").open("w"))
        self.background.append(proc)
        self.replicas_become({label: before.get(label, 0) + 1})

    def corral(self, command: Command) -> None:
        argv = [self.ids.get(arg, arg) for arg in command.argv[1:]]
        if argv[0] in MONITOR_VIEWS:
            self.monitor_judged()
        done = subprocess.run([*_corral(), *argv], cwd=ROOT, env={**self.env, "CORRAL_NATS_CREDENTIALS": self.operator},
                              capture_output=True, text=True, timeout=60)
        outcome = next((line for line in command.shown if line.startswith(("rejected ", "failed "))), "")
        code = 2 if outcome.startswith("rejected") else 1 if outcome.startswith("failed") else 0
        assert done.returncode == code, f"`{command.line}`: {done.stdout}{done.stderr}"
        assert_shows(command, done.stdout, self.ids, numbers_vary=argv[0] in VARYING)
        if argv[0] == "submit" and (end := re.search(rf"^(?:completed|failed) .*?({TASK_ID})", done.stdout, re.M)):
            self.settled(end.group(1))
        if argv[0] == "submit" and "--no-follow" in argv:
            self.stopped(done.stdout.strip())
        if argv[:2] == ["policy", "apply"] or argv[:2] == ["policy", "rollback"]:
            self.services_run(int(re.search(r"version (\d+)", done.stdout).group(1)))

    # --- waiting on what the next command depends on ---------------------------------------------

    def _ask(self, question):
        async def go():
            async with Client.connect(Settings(nats_url=self.url, nats_credentials=self.operator), "readme-test") as client:
                return await question(client)

        return anyio.run(go)

    def replicas(self) -> dict[str, int]:
        counts = self._ask(lambda client: client.running_services())
        return {name.removeprefix("corral-"): n for name, n in counts.items()}

    def replicas_become(self, wanted: dict[str, int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.replicas().get(name, 0) < n for name, n in wanted.items()):  # each ask waits 0.25 s
            assert time.monotonic() < deadline, f"not every service answered within {timeout} s: {wanted}"

    def settled(self, task_id: str, timeout: float = 10.0) -> None:
        """Until the budget has released the task (what `corral budget` and `corral cost` show)."""
        async def released(client: Client) -> None:
            with anyio.fail_after(timeout):
                while (await client.cost(task_id)).status != "finished":
                    await anyio.sleep(0.05)

        self._ask(released)

    def stopped(self, task_id: str, timeout: float = 10.0) -> None:
        """Until the task is no longer under way: ended, or waiting for a person's approval."""
        async def waits(client: Client) -> None:
            with anyio.fail_after(timeout):
                while (await client.task_status(task_id)).status in ("running", "unknown"):
                    await anyio.sleep(0.05)

        self._ask(waits)

    def services_run(self, version: int, timeout: float = 10.0) -> None:
        """Until every guard, executor and monitor judges by policy `version` (they switch within a second)."""
        async def switched(client: Client) -> None:
            with anyio.fail_after(timeout):
                for service, read in POLICY_VERSION.items():
                    while {read(s["endpoints"][0]["data"]) for s in await client.replica_stats(service)} != {version}:
                        pass  # each ask waits 0.25 s for every replica's answer

        self._ask(switched)

    def monitor_judged(self, timeout: float = 30.0) -> None:
        """Until the monitor has counted every task end the streams hold and judged its alert rules on them
        (a whole evaluation round since), and every service runs the policy now current (the monitor may
        have rolled it back)."""
        async def judged(client: Client) -> int:
            with anyio.fail_after(timeout):
                info = await client.bus.js.stream_info(subjects.STREAM_TASKS, subjects_filter="corral.task.>")
                ended = sum(n for subject, n in (info.state.subjects or {}).items()
                            if subject.startswith(("corral.task.completed.", "corral.task.failed.")))
                while (counts := (await client.status()).counts).get("task.completed", 0) + \
                        counts.get("task.failed", 0) < ended:
                    await anyio.sleep(0.05)
                start = await evaluations(client)
                while await evaluations(client) < start + 2:  # round start+1 began after the count, and ended
                    await anyio.sleep(0.1)
                version, _ = await read_policy(await client.bus.policy_bucket())
                return version

        self.services_run(self._ask(judged))

    def stop(self) -> None:
        for proc in reversed(self.background):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def evaluations(client: Client) -> int:
    return (await client.replica_stats("corral-monitor"))[0]["endpoints"][0]["data"]["alerts"]["evaluations"]


def _clear_of_the_hour() -> None:
    """Wait, if the next UTC hour is under TOUR_S away, until it has begun: the budget's hourly window."""
    now = datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second)
    if left < TOUR_S:
        time.sleep(left + 1)


@pytest.mark.timeout(TOUR_S + 180)
def test_every_tour_command_in_the_readme_prints_what_the_readme_shows(tmp_path):
    commands = [c for c in tour_commands(README.read_text()) if c.argv != ["make", "run"]]
    _clear_of_the_hour()
    hour = datetime.now(UTC).hour
    tour = Tour(tmp_path)
    try:
        for command in commands:
            reason = next((why for prefix, why in NOT_RUN.items() if command.line.startswith(prefix)), None)
            if reason is None:
                tour.run(command)
    except AssertionError:
        if datetime.now(UTC).hour != hour:
            pytest.fail(f"the tour took over {TOUR_S} s and crossed into a new hour, a new budget window: rerun it")
        raise
    finally:
        tour.stop()
