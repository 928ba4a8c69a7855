"""`make demo`: a one-node cluster in network namespaces, served by the real agent.

Builds the node, three pods and an outside client as network namespaces, runs
the API server double and `pykubeproxy` inside the node, creates a Service
with three endpoints, then shows what a learner would look at on a real node:
the KUBE-* chains in `iptables-legacy-save`, where 30 requests landed, what
`pykubeproxy explain` says those rules do with such a request (and with one to
every address of the Service), the health answer and a few metrics. Everything
is torn down at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

from pykubeproxy.sandbox.lab import Lab, endpoint_slice, service
from pykubeproxy.sandbox.netns import cleanup_stale, spread

CLUSTER_IP, PORT, NODE_PORT, TARGET = "10.96.0.10", 80, 30080, 8080
PODS = ("web-0", "web-1", "web-2")
SHOWN_METRICS = re.compile(
    r"^kubeproxy_(sync_proxy_rules_(duration_seconds_(count|sum)|iptables_total|"
    r"last_timestamp_seconds|service_changes_total|endpoint_changes_total)|"
    r"sync_full_proxy_rules_duration_seconds_count)"
)


def heading(text: str) -> None:
    print(f"\n== {text} ==")


def bars(counts: Counter[str], total: int) -> None:
    for name in sorted(counts):
        print(f"  {name:<6} {counts[name]:>3}/{total}  {'#' * counts[name]}")


def main() -> int:
    cleanup_stale()
    with Lab() as lab:
        cluster = lab.cluster
        for name in PODS:
            cluster.add_pod(name).serve_tcp(TARGET)
        heading("sandbox")
        print(
            f"  node {cluster.node_ip}, pods "
            + ", ".join(f"{name}={cluster.pods[name].ip}" for name in PODS)
            + f", client {cluster.client.ip}"
        )
        lab.server.create("services", service("web", CLUSTER_IP, PORT, TARGET, node_port=NODE_PORT))
        lab.server.create(
            "endpointslices",
            endpoint_slice("web", [cluster.pods[name].ip for name in PODS], TARGET),
        )
        print(
            f"  Service default/web: clusterIP {CLUSTER_IP}:{PORT}, nodePort {NODE_PORT}, "
            f"3 endpoints on :{TARGET}"
        )
        lab.start_agent()
        lab.wait_for(
            "the agent's first sync",
            lambda: lab.synced() and "default/web:p" in lab.nat_rules(),
        )

        heading("iptables-legacy-save -t nat | grep KUBE (on the node)")
        for line in lab.nat_rules().splitlines():
            if "KUBE-" in line and not line.startswith("#"):
                print("  " + line)

        total = 30
        heading(f"{total} requests from a pod to {CLUSTER_IP}:{PORT} (ClusterIP)")
        bars(spread(lambda: cluster.pods["web-0"].tcp_request(CLUSTER_IP, PORT), total), total)
        heading(f"{total} requests from outside to {cluster.node_ip}:{NODE_PORT} (NodePort)")
        bars(spread(lambda: cluster.client.tcp_request(cluster.node_ip, NODE_PORT), total), total)

        pod = cluster.pods["web-0"].ip
        for args in ((f"{CLUSTER_IP}:{PORT}", "--source", pod), ("svc", "default/web")):
            heading(f"pykubeproxy explain {' '.join(args)} (on the node)")
            explain = [sys.executable, "-m", "pykubeproxy", "explain", *args]
            for line in cluster.node.exec(explain, stdout=subprocess.PIPE).stdout.splitlines():
                print("  " + line)

        heading("curl http://127.0.0.1:10256/healthz")
        print("  " + lab.fetch("http://127.0.0.1:10256/healthz")[1])
        heading("curl http://127.0.0.1:10249/metrics | grep kubeproxy_ (a few)")
        for name, value in lab.metrics().items():
            if SHOWN_METRICS.match(name):
                print(f"  {name} {value:.10g}")
        code = lab.stop_agent()
        heading("teardown")
        print(
            f"  agent exited with {code} on SIGTERM (rules stay until --cleanup); "
            "removing namespaces"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
