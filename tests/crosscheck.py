"""`pykubeproxy explain` against real packets: what it predicts is what the kernel does.

`check` runs ``pykubeproxy explain -o json`` inside the node that handles a connection (it
reads that node's kernel), then sends real connections from the client namespace and
compares outcome sets: every endpoint predicted is reached and nothing else is, each seeing
the predicted source address (the client's, or the one MASQUERADE picks on that node), or
the connection is refused (REJECT) or times out (DROP) as predicted. Pods answer with their
names (pykubeproxy.sandbox.netns).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pykubeproxy.sandbox.netns import Host, NetNS, Pod, TrafficTimeout

DROP_TIMEOUT = 1.5  # seconds without an answer that count as DROP
# Seconds for one explain command: about one on hardware, minutes in the emulated IPVS VM.
EXPLAIN_TIMEOUT = 300.0
# ("10.244.0.2:8080", "masquerade"|"kept" or the source address seen), ("REJECT",), ("DROP",)
Outcome = tuple[str, ...]


def _from(source: str | None) -> list[str]:
    """The client: an address, or (None) the node itself, whose source the kernel picks."""
    return ["--source", source] if source else ["--from", "node"]


def explain(
    node: NetNS, ip: str, port: int, source: str | None, protocol: str = "tcp", *flags: str
) -> dict[str, Any]:
    """explain's JSON for one connection, computed inside `node` from its kernel."""
    argv = [sys.executable, "-m", "pykubeproxy", "explain", f"{ip}:{port}", *_from(source),
            "-p", protocol, "-o", "json", *flags]  # fmt: skip
    return dict(json.loads(node.exec(argv, timeout=EXPLAIN_TIMEOUT).stdout))


def explain_text(node: NetNS, ip: str, port: int, source: str | None, *flags: str) -> str:
    argv = [sys.executable, "-m", "pykubeproxy", "explain", f"{ip}:{port}", *_from(source),
            *flags]  # fmt: skip
    return str(node.exec(argv, timeout=EXPLAIN_TIMEOUT, check=False).stdout)


def _outcomes(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The outcomes of the one explanation in `document`, which must be exact (no rule
    the tracer could only assume about)."""
    (explanation,) = document["explanations"]
    (scenario,) = explanation["scenarios"]
    assert scenario["assumptions"] == [], scenario["assumptions"]
    outcomes = [o for o in scenario["outcomes"] if o["probability"] > 0]
    for outcome in outcomes:
        assert outcome["verdict"] != "ACCEPT" or outcome["endpoint"], f"no rule: {explanation}"
    return outcomes


def predicted(document: Mapping[str, Any]) -> set[Outcome]:
    """Endpoints with "masquerade" or "kept", or the verdict."""
    return {
        (o["endpoint"], "masquerade" if o["masquerade"] else "kept")
        if o["verdict"] == "ACCEPT" else (o["verdict"],)
        for o in _outcomes(document)
    }  # fmt: skip


def predicted_sources(document: Mapping[str, Any]) -> set[Outcome]:
    """Endpoints with the source address each will see, or the verdict."""
    return {
        (o["endpoint"], o["source"]) if o["verdict"] == "ACCEPT" else (o["verdict"],)
        for o in _outcomes(document)
    }


def observed(
    client: Host,
    ip: str,
    port: int,
    pods: Mapping[str, Pod],
    target: int,
    *,
    udp: bool = False,
    n: int = 30,
) -> set[Outcome]:
    """What `n` real connections from `client` do: the endpoint each reached and the source
    address the pod saw, or REJECT (refused) / DROP (no answer)."""
    found: set[Outcome] = set()
    proto = "udp" if udp else "tcp"
    for _ in range(n):
        before = {name: len(pod.seen_sources) for name, pod in pods.items()}
        try:
            send = client.udp_request if udp else client.tcp_request
            answer = send(ip, port, DROP_TIMEOUT)
        except ConnectionRefusedError:
            return found | {("REJECT",)}
        except TrafficTimeout:
            return found | {("DROP",)}
        pod = pods[answer]
        seen = [s for s in pod.seen_sources[before[answer] :] if s.proto == proto]
        assert seen, f"{answer} answered but recorded no {proto} peer"
        found.add((f"{pod.ip}:{target}", seen[-1].src_ip))
    return found


def check(
    node: NetNS,
    client: Host,
    ip: str,
    port: int,
    pods: Mapping[str, Pod],
    target: int,
    *,
    udp: bool = False,
    flags: Sequence[str] = (),
) -> set[Outcome]:
    """Assert that explain on `node` predicts what `client`'s connections do; return the
    prediction with "masquerade"/"kept" for the sources. When the client is the node, the
    kernel picks its source address, and explain is asked to pick it the same way."""
    protocol = "udp" if udp else "tcp"
    source = None if client is node else client.ip
    document = explain(node, ip, port, source, protocol, *flags)
    want = predicted_sources(document)
    n = 30 if any(len(o) == 2 for o in want) else 1
    got = observed(client, ip, port, pods, target, udp=udp, n=n)
    if got != want:
        text = explain_text(node, ip, port, source, "-p", protocol, *flags)
        raise AssertionError(f"explain predicted {want}, packets did {got}:\n{text}")
    return predicted(document)
