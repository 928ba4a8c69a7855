"""Small builders for Service and EndpointSlice API objects (raw JSON dicts)."""

from __future__ import annotations

from typing import Any


def service(
    namespace: str,
    name: str,
    cluster_ip: str,
    ports: list[dict[str, Any]],
    **spec: Any,
) -> dict[str, Any]:
    status = spec.pop("status", {})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"clusterIP": cluster_ip, "ports": ports, "type": "ClusterIP", **spec},
        "status": status,
    }


def port(name: str, number: int, protocol: str = "TCP", **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": number, "protocol": protocol, **extra}


def endpoint_slice(
    namespace: str,
    service_name: str,
    addresses: list[str],
    ports: list[dict[str, Any]],
    slice_name: str | None = None,
    ready: bool = True,
    **metadata: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": slice_name or f"{service_name}-abcde",
            "labels": {"kubernetes.io/service-name": service_name},
            **metadata,
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": ready}} for address in addresses
        ],
        "ports": ports,
    }
