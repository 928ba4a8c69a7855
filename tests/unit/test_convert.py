"""Bad input never raises: the bad part is dropped with one log line naming the object."""

from __future__ import annotations

import logging
from ipaddress import ip_address
from typing import Any

import objects as o
import pytest

from pykubeproxy.convert import endpoint_slice, service_ports
from pykubeproxy.model import Protocol


def test_a_good_service() -> None:
    svc = o.service(
        "ns",
        "web",
        "10.96.0.10",
        [o.port("http", 80, nodePort=30080), o.port("dns", 53, "UDP")],
        type="LoadBalancer",
        externalIPs=["203.0.113.1"],
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}},
    )
    ports = service_ports(svc)
    assert sorted(str(n) for n in ports) == ["ns/web:dns", "ns/web:http"]
    http = next(p for p in ports.values() if p.name.port == "http")
    assert http.node_port == 30080 and http.external_ips == (ip_address("203.0.113.1"),)
    assert http.load_balancer_ips == (ip_address("198.51.100.7"),)
    assert next(p for p in ports.values() if p.name.port == "dns").protocol is Protocol.UDP


@pytest.mark.parametrize("cluster_ip", ["None", "", None])
def test_headless_services_get_no_rules(cluster_ip: Any) -> None:
    assert service_ports(o.service("ns", "h", cluster_ip, [o.port("p", 80)])) == {}


def test_external_name_services_get_no_rules() -> None:
    assert (
        service_ports(o.service("ns", "x", "10.96.0.1", [o.port("p", 80)], type="ExternalName"))
        == {}
    )


@pytest.mark.parametrize(
    ("bad_port", "message"),
    [
        (o.port("p", 0), "out of range"),
        (o.port("p", 65536), "out of range"),
        (o.port("p", "80"), "not an integer"),
        (o.port("p", 80, "ICMP"), "unknown protocol"),
        (o.port("p", 80, nodePort=70000), "out of range"),
        ("eighty", "not an object"),
    ],
)
def test_a_bad_port_is_dropped_and_named(
    caplog: pytest.LogCaptureFixture, bad_port: Any, message: str
) -> None:
    svc = o.service("ns", "web", "10.96.0.10", [bad_port, o.port("good", 8080)])
    with caplog.at_level(logging.WARNING):
        ports = service_ports(svc)
    assert [str(n) for n in ports] == ["ns/web:good"]
    assert "Service ns/web" in caplog.text and message in caplog.text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["spec"].update(clusterIP="10.96.0.300"), "not an IP address"),
        (lambda s: s["spec"].update(ports="all"), "not a list"),
        (lambda s: s.update(spec=["x"]), "not an object"),
        (lambda s: s["metadata"].pop("name"), "metadata.name is missing"),
    ],
)
def test_a_bad_service_is_dropped_and_named(
    caplog: pytest.LogCaptureFixture, mutate: Any, message: str
) -> None:
    svc = o.service("ns", "web", "10.96.0.10", [o.port("p", 80)])
    mutate(svc)
    with caplog.at_level(logging.WARNING):
        assert service_ports(svc) == {}
    assert "Service ns/" in caplog.text and message in caplog.text


def test_bad_external_ips_are_dropped_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    svc = o.service(
        "ns", "web", "10.96.0.10", [o.port("p", 80)], externalIPs=["203.0.113.1", "not-an-ip", 7]
    )
    with caplog.at_level(logging.WARNING):
        (port,) = service_ports(svc).values()
    assert port.external_ips == (ip_address("203.0.113.1"),)
    assert caplog.text.count("Service ns/web") == 2


def test_endpoint_slices(caplog: pytest.LogCaptureFixture) -> None:
    eps = o.endpoint_slice(
        "ns",
        "web",
        ["10.244.0.2", "10.244.0.999", "10.244.0.3"],
        [o.port("http", 8080), o.port("bad", 0)],
    )
    eps["endpoints"][2]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    with caplog.at_level(logging.WARNING):
        info = endpoint_slice(eps)
    assert info is not None and [p.name for p in info.ports] == ["http"]
    assert [str(e.ip) for e in info.endpoints] == ["10.244.0.2", "10.244.0.3"]
    assert not info.endpoints[1].ready and info.endpoints[1].terminating
    assert caplog.text.count("EndpointSlice ns/web-abcde") == 2


def test_slices_without_service_label_or_of_other_families() -> None:
    eps = o.endpoint_slice("ns", "web", ["10.244.0.2"], [o.port("http", 80)])
    del eps["metadata"]["labels"]
    assert endpoint_slice(eps) is None
    v6 = o.endpoint_slice("ns", "web", ["fd00::2"], [o.port("http", 80)])
    v6["addressType"] = "IPv6"
    assert endpoint_slice(v6) is None
