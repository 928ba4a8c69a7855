"""The kernel features the IPVS proxy mode needs, proven with real packets (inside the VM).

One node namespace holds the dummy ``kube-ipvs0`` with the Service IP and two pods behind
cbr0 (see pykubeproxy.sandbox.netns). The virtual service and its real servers are created
through pyroute2's IPVS netlink API, as the agent does; ipvsadm only reads them back.

pyroute2 (0.9.x) facts these tests pin down:

* ``IPVSDest`` defaults to ``fwd_method=3`` (direct routing): pass ``fwd_method=0`` (masq).
* ``IPVSService`` defaults to ``sched_name="wlc"``, on "set" too: always pass the scheduler.
* Modify with "set"; "update" is mapped to IPVS_CMD_DEL_SERVICE / _DEL_DEST and deletes.
* ``IPVSDest.from_message`` keeps the default ``fwd_method`` 3: read the raw
  ``IPVS_DEST_ATTR_*`` attributes instead. ACTIVE_CONNS/INACT_CONNS are exact at once;
  ``IPVS_DEST_ATTR_STATS`` is summed by the kernel's estimator every ~2 s, so it lags.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from socket import IPPROTO_TCP
from typing import TypeVar

import pytest
from pyroute2 import IPVS, IPVSDest, IPVSService

from pykubeproxy.sandbox.netns import Cluster, Host, Pod, spread

pytestmark = pytest.mark.ipvs

SERVICE_IP = "10.96.0.10"
PORT = 80
TARGET_PORT = 8080
MASQ = 0  # IP_VS_CONN_F_MASQ
MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Node with kube-ipvs0 holding SERVICE_IP, pods "a" and "b" answering on TARGET_PORT."""
    with Cluster() as c:
        for name in ("a", "b"):
            c.add_pod(name).serve_tcp(TARGET_PORT)
        c.node.exec(["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
        c.node.exec(["ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "kube-ipvs0"])
        yield c


def ipvs_call(cluster: Cluster, fn: Callable[[IPVS], _T]) -> _T:
    """Run fn with a pyroute2 IPVS socket opened inside the node namespace."""

    def body() -> _T:
        with IPVS() as ipvs:
            return fn(ipvs)

    return cluster.node.run_inside(body, timeout=30.0)


def service(sched: str = "rr") -> IPVSService:
    return IPVSService(addr=SERVICE_IP, port=PORT, protocol=IPPROTO_TCP, sched_name=sched)


def dest(pod: Pod, weight: int = 1) -> IPVSDest:
    return IPVSDest(addr=pod.ip, port=TARGET_PORT, fwd_method=MASQ, weight=weight)


@pytest.fixture
def pods(cluster: Cluster) -> Iterator[tuple[Pod, Pod]]:
    """A fresh rr virtual service SERVICE_IP:PORT -> pods a, b (masq, weight 1); flushed after."""
    a, b = cluster.pods["a"], cluster.pods["b"]

    def create(ipvs: IPVS) -> None:
        ipvs.service("add", service=service())
        for pod in (a, b):
            ipvs.dest("add", service=service(), dest=dest(pod))

    ipvs_call(cluster, create)
    try:
        yield a, b
    finally:
        ipvs_call(cluster, lambda ipvs: [ipvs.service("del", service=service())])
        assert ipvs_call(cluster, lambda ipvs: ipvs.service("dump")) == []


def ask(host: Host) -> Callable[[], str]:
    return lambda: host.tcp_request(SERVICE_IP, PORT)


def ipvsadm(cluster: Cluster) -> str:
    return str(cluster.node.exec(["ipvsadm", "-Ln", "-t", f"{SERVICE_IP}:{PORT}"]).stdout)


def conns(cluster: Cluster) -> Counter[str]:
    """Active + inactive IPVS connections per real server IP, as pyroute2 reads them."""

    def read(ipvs: IPVS) -> Counter[str]:
        found: Counter[str] = Counter()
        for msg in ipvs.dest("dump", service=service()):
            attrs = dict(msg.get("IPVS_CMD_ATTR_DEST")["attrs"])
            found[attrs["IPVS_DEST_ATTR_ADDR"]] += (
                attrs["IPVS_DEST_ATTR_ACTIVE_CONNS"] + attrs["IPVS_DEST_ATTR_INACT_CONNS"]
            )
        return found

    return ipvs_call(cluster, read)


def test_rr_masq_service_reaches_both_pods(cluster: Cluster, pods: tuple[Pod, Pod]) -> None:
    a, b = pods
    table = ipvsadm(cluster)
    assert f"TCP  {SERVICE_IP}:{PORT} rr" in table
    for pod in pods:
        assert f"-> {pod.ip}:{TARGET_PORT}" in table
    assert table.count("Masq    1") == 2, table
    before = conns(cluster)

    assert spread(ask(cluster.node), 4) == {"a": 2, "b": 2}
    assert spread(ask(cluster.client), 4) == {"a": 2, "b": 2}

    # Masquerade forwarding = DNAT only: an outside client's address reaches the pod. The
    # node's own connections leave from the Service IP (the local source for a local dest).
    for pod in pods:
        assert {cluster.client.ip, SERVICE_IP} <= pod.seen_ips(TARGET_PORT)
    assert conns(cluster) - before == {a.ip: 4, b.ip: 4}


def test_set_changes_scheduler_and_weights(cluster: Cluster, pods: tuple[Pod, Pod]) -> None:
    a, b = pods

    def weigh(wa: int, wb: int) -> Callable[[IPVS], None]:
        def apply(ipvs: IPVS) -> None:
            ipvs.service("set", service=service("wrr"))
            ipvs.dest("set", service=service(), dest=dest(a, wa))
            ipvs.dest("set", service=service(), dest=dest(b, wb))

        return apply

    ipvs_call(cluster, weigh(3, 1))
    table = ipvsadm(cluster)
    assert f"{SERVICE_IP}:{PORT} wrr" in table
    assert f"{a.ip}:{TARGET_PORT}              Masq    3" in table
    assert spread(ask(cluster.client), 8) == {"a": 6, "b": 2}

    ipvs_call(cluster, weigh(1, 0))  # weight 0: b is drained, takes no new connections
    assert spread(ask(cluster.client), 4) == {"a": 4}


def test_pyroute2_update_deletes(cluster: Cluster, pods: tuple[Pod, Pod]) -> None:
    """pyroute2 maps "update" to the kernel's delete command: the agent must use "set"."""
    a, _ = pods
    ipvs_call(cluster, lambda ipvs: ipvs.dest("update", service=service(), dest=dest(a)))
    assert f"{a.ip}:{TARGET_PORT}" not in ipvsadm(cluster)
    ipvs_call(cluster, lambda ipvs: ipvs.service("update", service=service()))
    assert ipvs_call(cluster, lambda ipvs: ipvs.service("dump")) == []
    ipvs_call(cluster, lambda ipvs: ipvs.service("add", service=service()))  # for teardown


@pytest.fixture
def masquerade(cluster: Cluster) -> Iterator[None]:
    """kube-proxy's IPVS-mode masquerading: ipset of ClusterIP,port + mark + MASQUERADE."""
    node = cluster.node
    mark = ["!", "-s", cluster.cluster_cidr, "-m", "set", "--match-set", "KUBE-CLUSTER-IP",
            "dst,dst", "-j", "MARK", "--set-xmark", MARK]  # fmt: skip
    node.sysctl("net.ipv4.vs.conntrack", 1)  # let netfilter NAT IPVS-forwarded packets
    node.exec(["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"])
    try:
        node.exec(["ipset", "add", "KUBE-CLUSTER-IP", f"{SERVICE_IP},tcp:{PORT}"])
        for chain in ("PREROUTING", "OUTPUT"):
            node.exec(["iptables-legacy", "-t", "nat", "-A", chain, *mark])
        node.exec(["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-m", "mark",
                   "--mark", MARK, "-j", "MASQUERADE"])  # fmt: skip
        yield
    finally:
        node.exec(["iptables-legacy", "-t", "nat", "-F"])
        node.exec(["ipset", "destroy", "KUBE-CLUSTER-IP"])
        node.sysctl("net.ipv4.vs.conntrack", 0)


def test_ipset_iptables_masquerade_ipvs_traffic(
    cluster: Cluster, pods: tuple[Pod, Pod], masquerade: None
) -> None:
    for pod in pods:
        pod.seen_sources.clear()
    assert spread(ask(cluster.client), 2) == {"a": 1, "b": 1}
    assert spread(ask(cluster.node), 2) == {"a": 1, "b": 1}
    for pod in pods:
        assert pod.seen_ips(TARGET_PORT) == {cluster.gateway_ip}  # the node's cbr0 address
