"""Processes of the fault suite: worker processes (``tests.faults.worker_main``) started
with a test's settings and stopped by their own pid, and the ``agentfabric`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agentfabric.settings import Settings

from .worker_main import SERVICE_ENV

__all__ = ["ROOT", "Killed", "WorkerProcess", "Workers", "cli", "settings_env", "socket_ports"]

ROOT = Path(__file__).resolve().parents[2]
_PROCESSED = re.compile(r": (?:worker stopped: )?processed (\d+)")


def socket_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a process that should run with ``settings``: every setting that
    differs from its default as an ``AGENTFABRIC_*`` variable, no other ``AGENTFABRIC_*``
    (an unknown one is refused at start-up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    dumped = settings.model_dump(mode="json")  # nested models (trigger_tenants) as JSON
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None or value == info.get_default(call_default_factory=True):
            continue
        text = json.dumps(dumped[name]) if isinstance(value, list | dict) else str(value)
        env[f"AGENTFABRIC_{name.upper()}"] = text
    env.update(extra)
    return env


def cli(settings: Settings, *args: str, timeout_s: float = 120,
        ) -> subprocess.CompletedProcess[str]:
    """``agentfabric ARGS`` as a user runs it, with ``settings`` in its environment."""
    return subprocess.run([sys.executable, "-m", "agentfabric", *args], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@dataclass(frozen=True)
class Killed:
    """When a worker was sent SIGKILL, and the local ports of its TCP connections then."""

    ports: set[int]
    moment: float  # monotonic
    wall_ms: int


class WorkerProcess:
    """``python -m tests.faults.worker_main`` with its own log; stopped by its own pid."""

    def __init__(self, name: str, settings: Settings, log_dir: Path,
                 service_url: str | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        extra = {SERVICE_ENV: service_url} if service_url else {}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faults.worker_main"], cwd=ROOT,
                env=settings_env(settings, **extra), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.killed = False  # by the test: SIGKILL
        self.stopping = False  # by the test: SIGTERM

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def ready(self, within: float = 60) -> None:
        deadline = time.monotonic() + within
        while "worker ready" not in self.text():
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {within}s:\n"
                                     f"{self.text()[-4000:]}")
            await asyncio.sleep(0.1)

    async def kill9(self) -> Killed:
        """SIGKILL, without blocking the event loop while it dies."""
        ports = socket_ports(self.pid)  # read first: reading /proc takes a few ms
        moment, wall_ms = time.monotonic(), int(time.time() * 1000)
        os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        await asyncio.to_thread(self.proc.wait, 10)
        return Killed(ports, moment, wall_ms)

    async def stop(self, within: float = 60) -> int:
        """SIGTERM and wait (SIGKILL if it does not exit in time); the exit code."""
        self.stopping = True
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, within)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 10)
            raise AssertionError(f"{self.name} did not stop within {within}s:\n"
                                 f"{self.text()[-4000:]}") from None

    def processed(self) -> int:
        """The last count it logged (``processed N`` each second, or its final count)."""
        counts = _PROCESSED.findall(self.text())
        return int(counts[-1]) if counts else 0


class Workers:
    """The worker processes of one test; ``close`` stops every one still running."""

    def __init__(self, settings: Settings, log_dir: Path, service_url: str | None = None,
                 ) -> None:
        self.settings, self.log_dir, self.service_url = settings, log_dir, service_url
        self.all: list[WorkerProcess] = []

    def start(self) -> WorkerProcess:
        worker = WorkerProcess(f"worker{len(self.all) + 1}", self.settings, self.log_dir,
                               self.service_url)
        self.all.append(worker)
        return worker

    @property
    def running(self) -> list[WorkerProcess]:
        return [w for w in self.all if w.alive()]

    def check(self) -> None:
        """Every worker not killed by the test is still running."""
        for w in self.all:
            if not (w.killed or w.stopping) and not w.alive():
                raise AssertionError(f"{w.name} exited ({w.proc.returncode}):\n"
                                     f"{w.text()[-4000:]}")

    async def close(self) -> dict[str, int]:
        codes = {}
        for w in self.all:
            if w.alive():
                codes[w.name] = await w.stop()
        return codes


