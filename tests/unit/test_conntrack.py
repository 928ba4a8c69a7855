"""Which conntrack flows a sync's endpoint changes make stale (pure)."""

from __future__ import annotations

from ipaddress import ip_address

import objects as o

from pykubeproxy.changes import EndpointsUpdate
from pykubeproxy.conntrack import stale_flows
from pykubeproxy.convert import service_ports
from pykubeproxy.model import NamespacedName


def test_udp_flows_to_removed_endpoints_and_to_newly_served_services() -> None:
    dns = service_ports(
        o.service(
            "ns",
            "dns",
            "10.96.0.53",
            [o.port("dns", 53, "UDP", nodePort=30053)],
            type="NodePort",
            externalIPs=["203.0.113.5"],
        )
    )
    web = service_ports(o.service("ns", "web", "10.96.0.10", [o.port("http", 80)]))
    (dns_port,) = dns
    (web_port,) = web
    update = EndpointsUpdate(
        changed={NamespacedName("ns", "dns"), NamespacedName("ns", "web")},
        stale_endpoints={
            dns_port: {ip_address("10.244.0.2")},
            web_port: {ip_address("10.244.0.9")},
        },
    )
    assert stale_flows(update, {**dns, **web}) == [
        [
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            "10.96.0.53",
            "--orig-port-dst",
            "53",
            "--dst-nat",
            "10.244.0.2",
        ],
        [
            "-D",
            "-p",
            "udp",
            "--orig-dst",
            "203.0.113.5",
            "--orig-port-dst",
            "53",
            "--dst-nat",
            "10.244.0.2",
        ],
        ["-D", "-p", "udp", "--orig-port-dst", "30053", "--dst-nat", "10.244.0.2"],
    ]
    served = EndpointsUpdate(changed=set(), newly_served={dns_port})
    assert stale_flows(served, dns)[0] == [
        "-D",
        "-p",
        "udp",
        "--orig-dst",
        "10.96.0.53",
        "--orig-port-dst",
        "53",
    ]
