"""The sample services as processes: started and stopped by pid with the embedded stack,
and as the session fixture ``services``."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from agentfabric.errors import PortInUseError
from streams.embedded import EmbeddedStack, free_port, pid_alive

from ..servicefixture import RunningServices, healthy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def get_json(url: str, tenant: str | None = None) -> object:
    request = urllib.request.Request(url, headers={"X-Tenant": tenant} if tenant else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_stack_starts_and_stops_the_services_by_pid(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path / "stack", broker_port=free_port(), redis_port=free_port(),
                          crm_port=free_port(), erp_port=free_port())
    info = stack.start(services=True)
    try:
        assert set(info.services) == {"crm", "erp"}
        for name, url in info.service_urls.items():
            assert healthy(url), name
        recorded = json.loads(stack.state_path.read_text())["services"]
        assert {name: proc["pid"] for name, proc in recorded.items()} == {
            name: proc.pid for name, proc in info.services.items()}
        assert json.loads(info.env()["AGENTFABRIC_SERVICE_URLS"]) == info.service_urls
        account = get_json(f"{info.service_urls['crm']}/accounts/contoso.com")
        assert isinstance(account, dict)
        assert account["found"] is True
        assert stack.running() == info
    finally:
        stopped = stack.stop()
    assert {proc.name for proc in stopped} == {"broker", "redis", "crm", "erp"}
    for proc in info.processes:
        assert not pid_alive(proc.pid, proc.binary), proc.name
    assert not stack.state_path.exists()


def test_stack_without_services_records_none(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path / "stack", broker_port=free_port(), redis_port=free_port())
    info = stack.start()
    try:
        assert info.services == {}
        assert "AGENTFABRIC_SERVICE_URLS" not in info.env()
    finally:
        stack.stop()
    for proc in info.processes:
        assert not pid_alive(proc.pid, proc.binary)


def test_a_service_port_in_use_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = EmbeddedStack(tmp_path / "stack", broker_port=free_port(),
                              redis_port=free_port(), erp_port=port)
        with pytest.raises(PortInUseError, match="AGENTFABRIC_ERP_PORT"):
            stack.start(services=True)
    assert not stack.state_path.exists()


def test_the_services_fixture(services: RunningServices) -> None:
    assert set(services.urls) == {"crm", "erp"}
    for name, url in services.urls.items():
        assert healthy(url), name
        assert pid_alive(services.pids[name])
    vendor = get_json(f"{services.urls['erp']}/vendors/V-1001", tenant="acme")
    assert isinstance(vendor, dict)
    assert vendor["status"] == "approved"
