"""The sample CRM and ERP as subprocesses on free ports (``python -m tools.services``), for the
session fixture ``services``: started together, ready when ``/healthz`` answers, stopped by
their own pids."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from streams.embedded import free_port, pid_alive

READY_TIMEOUT_S = 20.0
NAMES = ("crm", "erp")


@dataclass(frozen=True)
class RunningServices:
    """``urls``: name to base URL (``{"crm": "http://127.0.0.1:PORT", "erp": ...}``);
    ``pids``: name to process id."""

    urls: dict[str, str]
    pids: dict[str, int]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=0.5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(name: str, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} service exited at start-up (code {proc.returncode}):"
                               f" {log.read_text(errors='replace')[-500:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {name} service did not answer {url}/healthz within "
                               f"{READY_TIMEOUT_S:.0f}s; see {log}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not pid_alive(proc.pid), f"service pid {proc.pid} still runs"


@contextmanager
def running_services(log_dir: Path, host: str = "127.0.0.1") -> Iterator[RunningServices]:
    """Start both services, yield their URLs and pids, then stop each by its pid."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    with ExitStack() as cleanup:
        for name in NAMES:
            port = free_port(host)
            log = log_dir / f"{name}.log"
            with open(log, "ab") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "tools.services", name, "--host", host,
                     "--port", str(port)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            cleanup.callback(_stop, procs[name])
            urls[name] = f"http://{host}:{port}"
        for name, proc in procs.items():
            _wait_healthy(name, urls[name], proc, log_dir / f"{name}.log")
        yield RunningServices(urls=urls, pids={name: p.pid for name, p in procs.items()})
