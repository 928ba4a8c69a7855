"""Service health check servers: upstream's answers, and servers following the Services.

The scenarios follow upstream ``pkg/proxy/healthcheck/healthcheck_test.go``
(``TestServer``) but run real listeners on 127.0.0.1 with free ports.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Iterator

import pytest

from pykubeproxy.healthcheck import ServiceHealthServer, listen_hosts, service_health_response
from pykubeproxy.model import NamespacedName

SVC_A = NamespacedName("a", "b")
SVC_B = NamespacedName("c", "d")


class ProxyHealth:
    def __init__(self) -> None:
        self.healthy = True

    def __call__(self) -> bool:
        return self.healthy


@pytest.fixture
def proxy_health() -> ProxyHealth:
    return ProxyHealth()


@pytest.fixture
def hcs(proxy_health: ProxyHealth) -> Iterator[ServiceHealthServer]:
    server = ServiceHealthServer(lambda: ["127.0.0.1"], proxy_health)
    try:
        yield server
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def get(port: int, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, "/healthz")
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_body_is_upstreams_template_byte_for_byte() -> None:
    status, headers, body = service_health_response(NamespacedName("default", "web"), 1, True)
    assert status == 200
    assert body == (
        b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
        b'\t"localEndpoints": 1,\n\t"serviceProxyHealthy": true\n}'
    )
    assert headers == (
        ("Content-Type", "application/json"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Load-Balancing-Endpoint-Weight", "1"),
    )


@pytest.mark.parametrize(
    ("local_endpoints", "proxy_healthy", "status"),
    [(0, True, 503), (18, True, 200), (7, False, 503), (0, False, 503)],
)
def test_status_needs_local_endpoints_and_a_healthy_proxy(
    local_endpoints: int, proxy_healthy: bool, status: int
) -> None:
    response = service_health_response(SVC_A, local_endpoints, proxy_healthy)
    assert response.status == status
    assert json.loads(response.body) == {
        "service": {"namespace": "a", "name": "b"},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    assert dict(response.headers)["X-Load-Balancing-Endpoint-Weight"] == str(local_endpoints)


def test_listens_on_the_node_addresses_or_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    wildcard = ("::",) if socket.has_dualstack_ipv6() else ("0.0.0.0",)
    assert listen_hosts(None) == wildcard
    assert listen_hosts(lambda: ["10.0.0.1", "fd00::1", "10.0.0.1"]) == ("10.0.0.1", "fd00::1")
    assert listen_hosts(list) == ()

    def broken() -> list[str]:
        raise OSError("netlink down")

    assert listen_hosts(broken) == wildcard
    assert len(caplog.records) == 1 and "netlink down" in caplog.text


def test_answers_follow_endpoints_and_proxy_health(
    hcs: ServiceHealthServer, proxy_health: ProxyHealth
) -> None:
    port = free_port()
    hcs.sync_endpoints({SVC_A: 93})  # unknown Services are ignored
    hcs.sync_services({SVC_A: port})
    status, headers, body = get(port)
    assert status == 503 and json.loads(body)["localEndpoints"] == 0
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"

    hcs.sync_endpoints({SVC_A: 18})
    status, headers, body = get(port)
    assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (200, "18")
    assert body == service_health_response(SVC_A, 18, True).body

    proxy_health.healthy = False
    status, _, body = get(port)
    assert status == 503 and json.loads(body)["serviceProxyHealthy"] is False
    proxy_health.healthy = True

    hcs.sync_endpoints({})
    assert get(port)[0] == 503
    hcs.sync_endpoints({SVC_A: 1})
    status, headers, body = get(port, "HEAD")
    full_length = len(service_health_response(SVC_A, 1, True).body)
    assert (status, body, headers["Content-Length"]) == (200, b"", str(full_length))


def test_servers_follow_the_services(hcs: ServiceHealthServer) -> None:
    port_a, port_b, moved_b = free_port(), free_port(), free_port()
    hcs.sync_services({SVC_A: port_a, SVC_B: port_b})
    hcs.sync_endpoints({SVC_A: 9, SVC_B: 3})
    assert get(port_a)[0] == get(port_b)[0] == 200

    hcs.sync_services({SVC_B: moved_b})
    assert_refused(port_a)
    assert_refused(port_b)
    # A moved port starts again from no endpoints until the next endpoint sync.
    assert get(moved_b)[0] == 503
    hcs.sync_endpoints({SVC_B: 3})
    assert get(moved_b)[0] == 200

    hcs.sync_services({})
    assert_refused(moved_b)


def test_port_in_use_is_one_warning_and_retried(
    hcs: ServiceHealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    busy_port, port_b = free_port(), free_port()
    with socket.create_server(("127.0.0.1", busy_port)):
        with caplog.at_level(logging.WARNING):
            hcs.sync_services({SVC_A: busy_port, SVC_B: port_b})
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "a/b" in caplog.text and str(busy_port) in caplog.text
        hcs.sync_endpoints({SVC_A: 1, SVC_B: 1})
        assert get(port_b)[0] == 200
    hcs.sync_services({SVC_A: busy_port, SVC_B: port_b})
    hcs.sync_endpoints({SVC_A: 1, SVC_B: 1})
    assert get(busy_port)[0] == get(port_b)[0] == 200


def test_close_stops_every_server(proxy_health: ProxyHealth) -> None:
    hcs = ServiceHealthServer(lambda: ["127.0.0.1"], proxy_health)
    ports = {SVC_A: free_port(), SVC_B: free_port()}
    hcs.sync_services(ports)
    assert get(ports[SVC_A])[0] == 503
    hcs.close()
    for port in ports.values():
        assert_refused(port)
