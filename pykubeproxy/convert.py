"""Translate raw API objects (JSON dicts) into the typed model.

This is the one place that trusts nothing: every field may be missing, of the
wrong type or out of range. A bad part of an object is dropped with one log
line that names the object; a bad object is dropped whole. Nothing here raises
on data, so one malformed Service can never stop the agent or hide the others.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

from pykubeproxy.model import (
    Endpoint,
    IPAddress,
    IPNetwork,
    NamespacedName,
    NodeFacts,
    Protocol,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
DEFAULT_AFFINITY_SECONDS = 10800

Family = type[IPv4Address] | type[IPv6Address]


NO_HINTS: frozenset[str] = frozenset()


class Invalid(ValueError):
    """A field that cannot be used; the message says which and why."""


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict and not isinstance(value, Mapping):  # dict: JSON's, and fast
        raise Invalid(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid(f"{what} is not a list")
    return value


def _port(value: Any, what: str, *, allow_zero: bool = False) -> int:
    if value is None and allow_zero:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{what} {value!r} is not an integer")
    if value == 0 and allow_zero:
        return 0
    if not 1 <= value <= 65535:
        raise Invalid(f"{what} {value} is out of range 1-65535")
    return value


def _protocol(value: Any) -> Protocol:
    if value is None:
        return Protocol.TCP
    if not isinstance(value, str):
        raise Invalid(f"protocol {value!r} is not a string")
    try:
        return Protocol(value.lower())
    except ValueError:
        raise Invalid(f"unknown protocol {value!r}") from None


def parse_ip_sloppy(text: str) -> IPAddress:
    """An address as kube-proxy parses it: IPv4 octets may carry leading zeros.

    Objects written before the API server validated addresses strictly can hold
    spellings like ``010.001.002.003``; upstream (k8s.io/utils/net ParseIPSloppy)
    reads each octet as decimal, so ``010`` is 10, never octal 8. Raises ValueError.
    """
    try:  # the common case, an IPv4 address as the API writes it, at C speed
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    text = text.strip()
    try:
        return ip_address(text)
    except ValueError:
        octets = text.split(".")
        if len(octets) != 4 or not all(o.isdigit() and len(o) <= 3 for o in octets):
            raise
        return ip_address(".".join(str(int(o)) for o in octets))


def _ip(value: Any, what: str) -> IPAddress:
    if not isinstance(value, str):
        raise Invalid(f"{what} {value!r} is not a string")
    try:
        return parse_ip_sloppy(value)
    except ValueError:
        raise Invalid(f"{what} {value!r} is not an IP address") from None


def _string(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Invalid(f"{what} {value!r} is not a string")
    return value


def object_name(obj: Any) -> NamespacedName:
    """The namespace/name of an object; raises Invalid when it has none."""
    meta = _mapping(obj.get("metadata") if isinstance(obj, dict | Mapping) else None, "metadata")
    namespace = _string(meta.get("namespace"), "metadata.namespace")
    name = _string(meta.get("name"), "metadata.name")
    if not name:
        raise Invalid("metadata.name is missing")
    return NamespacedName(namespace, name)


def describe(kind: str, obj: Any) -> str:
    """``Service ns/name`` for log lines, even when the object is broken."""
    try:
        return f"{kind} {object_name(obj)}"
    except Invalid:
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        return f"{kind} {namespace if isinstance(namespace, str) else ''}/<unnamed>"


def _each_valid(items: list[Any], parse: Callable[[Any], Any], what: str, owner: str) -> list[Any]:
    """Parse every item, dropping (and logging) the ones that are invalid."""
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse(item))
        except Invalid as err:
            log.warning("%s: ignoring %s[%d]: %s", owner, what, index, err)
    return parsed


def service_ports(obj: Any, family: Family = IPv4Address) -> ServicePortMap:
    """The proxied ports of a Service: empty for headless/ExternalName/bad ones."""
    owner = describe("Service", obj)
    try:
        return _service_ports(obj, family, owner)
    except Invalid as err:
        log.warning("%s: ignoring the Service: %s", owner, err)
        return {}


def _service_ports(obj: Any, family: Family, owner: str) -> ServicePortMap:
    name = object_name(obj)
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    if spec.get("type") == "ExternalName":
        return {}
    cluster_ip_text = _string(spec.get("clusterIP"), "spec.clusterIP")
    if cluster_ip_text in ("", "None"):
        return {}
    cluster_ips = [_ip(cluster_ip_text, "spec.clusterIP")]
    cluster_ips += _each_valid(
        _list(spec.get("clusterIPs"), "spec.clusterIPs"),
        lambda v: _ip(v, "clusterIP"),
        "spec.clusterIPs",
        owner,
    )
    cluster_ip = next((ip for ip in cluster_ips if isinstance(ip, family)), None)
    if cluster_ip is None:
        return {}

    def same_family(ips: list[IPAddress]) -> tuple[IPAddress, ...]:
        return tuple(ip for ip in ips if isinstance(ip, family))

    external_ips = same_family(
        _each_valid(
            _list(spec.get("externalIPs"), "spec.externalIPs"),
            lambda v: _ip(v, "IP"),
            "spec.externalIPs",
            owner,
        )
    )
    is_load_balancer = spec.get("type") == "LoadBalancer"
    lb_ingress = _list(
        _mapping(status.get("loadBalancer"), "status.loadBalancer").get("ingress"),
        "status.loadBalancer.ingress",
    )
    # An ingress in ipMode Proxy is a load balancer that proxies to the NodePorts
    # itself: kube-proxy programs nothing for its address (pkg/proxy/service.go).
    lb_ips = same_family(
        _each_valid(
            [
                i
                for i in lb_ingress
                if isinstance(i, Mapping) and i.get("ip") and i.get("ipMode") != "Proxy"
            ],
            lambda i: _ip(i["ip"], "ingress IP"),
            "status.loadBalancer.ingress",
            owner,
        )
    )
    source_ranges = tuple(
        r
        for r in _each_valid(
            _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges"),
            _cidr,
            "spec.loadBalancerSourceRanges",
            owner,
        )
        if r.version == cluster_ip.version
    )
    affinity = None
    if spec.get("sessionAffinity") == "ClientIP":
        config = _mapping(
            _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig").get(
                "clientIP"
            ),
            "spec.sessionAffinityConfig.clientIP",
        )
        timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_SECONDS)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise Invalid(f"sessionAffinityConfig timeoutSeconds {timeout!r} is invalid")
        affinity = timeout
    external_local = spec.get("externalTrafficPolicy") == "Local" and (
        spec.get("type") in ("NodePort", "LoadBalancer") or bool(external_ips)
    )
    health_check_port = 0
    if external_local and is_load_balancer:
        health_check_port = _port(
            spec.get("healthCheckNodePort"), "spec.healthCheckNodePort", allow_zero=True
        )
        if not health_check_port:
            log.warning("%s: externalTrafficPolicy Local but no healthCheckNodePort", owner)

    def parse_port(raw: Any) -> ServicePort:
        port = _mapping(raw, "port")
        port_name = ServicePortName(
            name, _string(port.get("name"), "name"), _protocol(port.get("protocol"))
        )
        return ServicePort(
            name=port_name,
            cluster_ip=cluster_ip,
            port=_port(port.get("port"), "port"),
            node_port=_port(port.get("nodePort"), "nodePort", allow_zero=True),
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=source_ranges,
            session_affinity_seconds=affinity,
            external_policy_local=external_local,
            internal_policy_local=spec.get("internalTrafficPolicy") == "Local",
            health_check_node_port=health_check_port,
        )

    ports = _each_valid(_list(spec.get("ports"), "spec.ports"), parse_port, "spec.ports", owner)
    return {p.name: p for p in ports}


def _cidr(value: Any) -> IPNetwork:
    """A CIDR as upstream parses it (ParseCIDRSloppy): surrounding blanks and leading
    zeros in IPv4 octets are accepted, host bits are masked off."""
    if not isinstance(value, str):
        raise Invalid(f"CIDR {value!r} is not a string")
    address, slash, prefix = value.strip().partition("/")
    try:
        if not slash or not prefix.isdigit():
            raise ValueError(value)
        return ip_network(f"{parse_ip_sloppy(address)}/{int(prefix)}", strict=False)
    except ValueError:
        raise Invalid(f"{value!r} is not a CIDR") from None


@dataclass(frozen=True)
class SlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True)
class EndpointSliceInfo:
    """What kube-proxy keeps of one EndpointSlice."""

    service: NamespacedName
    name: str
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]
    trigger_time: datetime | None = None


def endpoint_slice(obj: Any, family: Family = IPv4Address) -> EndpointSliceInfo | None:
    """The slice's usable content, or None when it is not for this proxier."""
    owner = describe("EndpointSlice", obj)
    try:
        return _endpoint_slice(obj, family, owner)
    except Invalid as err:
        log.warning("%s: ignoring the EndpointSlice: %s", owner, err)
        return None


def slice_service(obj: Any) -> NamespacedName | None:
    """The Service a slice belongs to, from its service-name label."""
    try:
        meta = _mapping(obj.get("metadata"), "metadata")
        labels = _mapping(meta.get("labels"), "metadata.labels")
        service = _string(labels.get(SERVICE_NAME_LABEL), SERVICE_NAME_LABEL)
        return NamespacedName(object_name(obj).namespace, service) if service else None
    except (Invalid, AttributeError):
        return None


def _endpoint_slice(obj: Any, family: Family, owner: str) -> EndpointSliceInfo | None:
    name = object_name(obj)
    service = slice_service(obj)
    if service is None:
        raise Invalid(f"label {SERVICE_NAME_LABEL} is missing")
    address_type = obj.get("addressType")
    wanted = "IPv4" if family is IPv4Address else "IPv6"
    if address_type != wanted:
        return None

    def parse_port(raw: Any) -> SlicePort:
        port = _mapping(raw, "port")
        return SlicePort(
            _string(port.get("name"), "name"),
            _port(port.get("port"), "port"),
            _protocol(port.get("protocol")),
        )

    def parse_endpoint(raw: Any) -> Endpoint:
        endpoint = _mapping(raw, "endpoint")
        addresses = _list(endpoint.get("addresses"), "addresses")
        if not addresses:
            raise Invalid("no addresses")
        ip = _ip(addresses[0], "address")
        if not isinstance(ip, family):
            raise Invalid(f"address {ip} is not {wanted}")
        conditions = _mapping(endpoint.get("conditions"), "conditions")
        hints = _mapping(endpoint.get("hints"), "hints")

        def hint_names(key: str) -> frozenset[str]:
            if not hints:
                return NO_HINTS
            return frozenset(
                h["name"]
                for h in _list(hints.get(key), f"hints.{key}")
                if isinstance(h, Mapping) and isinstance(h.get("name"), str)
            )

        # Unset ready/serving mean true and unset terminating means false (API defaults).
        return Endpoint(
            ip=ip,
            port=0,
            ready=conditions.get("ready") is not False,
            serving=conditions.get("serving") is not False,
            terminating=conditions.get("terminating") is True,
            node_name=_string(endpoint.get("nodeName"), "nodeName") or None,
            zone_hints=hint_names("forZones"),
            node_hints=hint_names("forNodes"),
        )

    ports = tuple(_each_valid(_list(obj.get("ports"), "ports"), parse_port, "ports", owner))
    endpoints = tuple(
        _each_valid(_list(obj.get("endpoints"), "endpoints"), parse_endpoint, "endpoints", owner)
    )
    annotations = _mapping(_mapping(obj.get("metadata"), "metadata").get("annotations"), "")
    return EndpointSliceInfo(service, name.name, ports, endpoints, _timestamp(annotations))


def _timestamp(annotations: Mapping[str, Any]) -> datetime | None:
    value = annotations.get(TRIGGER_TIME_ANNOTATION)
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def node_is_deleting(obj: Any) -> bool:
    """Whether the Node carries a deletionTimestamp (kube-proxy's nodeEligible)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return isinstance(meta, Mapping) and bool(meta.get("deletionTimestamp"))


ZONE_LABEL = "topology.kubernetes.io/zone"
NODE_IP_TYPES = ("InternalIP", "ExternalIP")


def node_facts(obj: Any, name: str) -> NodeFacts:
    """The zone label and primary IP of this node's Node object (kube-proxy's view).

    The primary IP is the first InternalIP, else the first ExternalIP, as
    upstream picks it; a Node without either, or no Node at all, has none.
    """
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    zone = labels.get(ZONE_LABEL) if isinstance(labels, Mapping) else None
    status = obj.get("status") if isinstance(obj, Mapping) else None
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    found: dict[str, IPAddress] = {}
    for address in addresses if isinstance(addresses, list) else []:
        if not isinstance(address, Mapping) or address.get("type") not in NODE_IP_TYPES:
            continue  # Hostname, InternalDNS, ...: names, not addresses
        if address.get("type") in found:
            continue
        try:
            found[str(address.get("type"))] = _ip(address.get("address"), "node address")
        except Invalid as err:
            log.warning("Node %s: ignoring status.addresses entry: %s", name, err)
    ip = found.get("InternalIP") or found.get("ExternalIP")
    return NodeFacts(name, zone if isinstance(zone, str) else "", ip)
