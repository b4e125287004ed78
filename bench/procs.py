"""Child processes of the benchmark suite, each started in its own session and stopped by pid.

Every process the suite starts is registered here, so ``stop_all`` (run in a ``finally`` of the
suite, also on Ctrl-C and SIGTERM) ends exactly those pids: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "Children", "agentfabric_bin", "run_cli", "wait_for_http", "wait_for_log"]

REPO = Path(__file__).resolve().parent.parent


def agentfabric_bin() -> str:
    """The ``agentfabric`` console script of the interpreter running the suite."""
    candidate = Path(sys.executable).parent / "agentfabric"
    return str(candidate) if candidate.exists() else "agentfabric"


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started_at: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(empty log)"

    def log_contains(self, needle: str) -> bool:
        try:
            return needle in self.log.read_text(errors="replace")
        except OSError:
            return False


class Children:
    """The processes the suite started; stopped by their own pid, never by name."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: dict[int, Child] = {}

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True, close_fds=True)
        child = Child(name, popen, log)
        self._running[popen.pid] = child
        return child

    def stop(self, child: Child, timeout_s: float = 30.0) -> int | None:
        """SIGTERM ``child`` by pid, wait up to ``timeout_s``, then SIGKILL; its exit code."""
        self._running.pop(child.pid, None)
        if child.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
            try:
                child.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.popen.wait()
        child.exit_code = child.popen.returncode
        return child.exit_code

    async def astop(self, child: Child, timeout_s: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.stop, child, timeout_s)

    def stop_all(self) -> None:
        for child in list(self._running.values()):
            self.stop(child, timeout_s=10.0)


async def wait_for_log(child: Child, needle: str, timeout_s: float) -> None:
    """Wait until ``child``'s output contains ``needle``; fail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.log_contains(needle):
            return
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} (pid {child.pid}) exited with code "
                               f"{child.popen.returncode}:\n{child.log_tail()}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{child.name} (pid {child.pid}) did not print {needle!r} within "
                       f"{timeout_s:.0f}s:\n{child.log_tail()}")


async def wait_for_http(child: Child, url: str, timeout_s: float) -> None:
    """Wait until ``url`` answers 200; fail if ``child`` exits or it times out."""
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(probe):
            return
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} (pid {child.pid}) exited with code "
                               f"{child.popen.returncode}:\n{child.log_tail()}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} did not answer {url} within {timeout_s:.0f}s:\n"
                       f"{child.log_tail()}")


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 60.0) -> str:
    """Run a short ``agentfabric`` command to completion; its output, or an error with it."""
    done = subprocess.run([agentfabric_bin(), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`agentfabric {' '.join(args)}` failed ({done.returncode}):\n"
                           f"{done.stdout}\n{done.stderr}")
    return done.stdout
