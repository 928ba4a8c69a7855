"""Change trackers: what changed since the last sync, per Service.

As in kube-proxy, each tracker keeps the state last applied to the kernel and
the latest state seen from the API. A Service whose latest state equals the
applied one has no pending change, however many events came in between (an
update and its revert cancel out). `apply()` moves the pending state into the
applied maps and returns the Services that changed: that set drives partial
syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address
from typing import Any

from pykubeproxy.convert import EndpointSliceInfo, Family, endpoint_slice, service_ports
from pykubeproxy.model import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    ServicePortMap,
    ServicePortName,
)


@dataclass
class ServiceChangeTracker:
    """Pending Service changes, keyed by Service."""

    family: Family = IPv4Address
    service_map: ServicePortMap = field(default_factory=dict)
    _applied: dict[NamespacedName, ServicePortMap] = field(default_factory=dict)
    _latest: dict[NamespacedName, ServicePortMap] = field(default_factory=dict)
    changed_ports: set[ServicePortName] = field(default_factory=set)

    def update(self, name: NamespacedName, obj: Any | None) -> bool:
        """Record the latest version of a Service (None once deleted)."""
        self._latest[name] = service_ports(obj, self.family) if obj is not None else {}
        if self._latest[name] == self._applied.get(name, {}):
            del self._latest[name]
        return bool(self._latest)

    def pending(self) -> int:
        return len(self._latest)

    def apply(self) -> set[NamespacedName]:
        """Make the pending changes current; return the Services that changed.

        `changed_ports` then names every port, before or after, of those Services.
        """
        changed = set(self._latest)
        self.changed_ports = set()
        for name, ports in self._latest.items():
            before = self._applied.pop(name, {})
            self.changed_ports |= before.keys() | ports.keys()
            for port_name in before:
                del self.service_map[port_name]
            if ports:
                self._applied[name] = ports
                self.service_map.update(ports)
        self._latest.clear()
        return changed


@dataclass
class EndpointsUpdate:
    """What one `EndpointsChangeTracker.apply()` changed."""

    changed: set[NamespacedName]
    trigger_times: list[datetime] = field(default_factory=list)
    # Every port, before or after, of the Services whose endpoints changed.
    changed_ports: set[ServicePortName] = field(default_factory=set)


@dataclass
class EndpointsChangeTracker:
    """Merges the EndpointSlices of each Service and tracks pending changes."""

    family: Family = IPv4Address
    endpoints_map: EndpointsMap = field(default_factory=dict)
    _slices: dict[NamespacedName, dict[str, EndpointSliceInfo]] = field(default_factory=dict)
    _applied: dict[NamespacedName, EndpointsMap] = field(default_factory=dict)
    # Services whose merged endpoints differ from the applied ones, with those endpoints.
    _dirty: dict[NamespacedName, EndpointsMap] = field(default_factory=dict)
    _trigger_times: dict[NamespacedName, list[datetime]] = field(default_factory=dict)

    def update(self, service: NamespacedName, slice_name: str, obj: Any | None) -> bool:
        """Record the latest version of one slice of `service` (None once deleted)."""
        info = endpoint_slice(obj, self.family) if obj is not None else None
        slices = self._slices.setdefault(service, {})
        if info is None:
            slices.pop(slice_name, None)
        else:
            slices[slice_name] = info
            if info.trigger_time is not None:
                self._trigger_times.setdefault(service, []).append(info.trigger_time)
        if not slices:
            del self._slices[service]
        merged = self._merged(service)
        if merged == self._applied.get(service, {}):
            self._dirty.pop(service, None)
            self._trigger_times.pop(service, None)
        else:
            self._dirty[service] = merged
        return bool(self._dirty)

    def pending(self) -> int:
        return len(self._dirty)

    def _merged(self, service: NamespacedName) -> EndpointsMap:
        by_port: dict[ServicePortName, dict[str, Endpoint]] = {}
        for info in self._slices.get(service, {}).values():
            for port in info.ports:
                port_name = ServicePortName(service, port.name, port.protocol)
                known = by_port.setdefault(port_name, {})
                for endpoint in info.endpoints:
                    endpoint = endpoint.with_port(port.port)
                    # The same address in two slices: a pod that reuses a terminating
                    # pod's IP wins over it (upstream's EndpointSliceCache.addEndpoints).
                    if endpoint.address not in known or not endpoint.terminating:
                        known[endpoint.address] = endpoint
        return {
            name: tuple(endpoints[address] for address in sorted(endpoints))
            for name, endpoints in by_port.items()
        }

    def apply(self) -> EndpointsUpdate:
        """Make pending changes current; say what changed, for syncs and conntrack cleanup."""
        update = EndpointsUpdate(changed=set(self._dirty))
        for service, merged in self._dirty.items():
            before = self._applied.pop(service, {})
            for port_name in before:
                del self.endpoints_map[port_name]
            if merged:
                self._applied[service] = merged
                self.endpoints_map.update(merged)
            update.changed_ports |= before.keys() | merged.keys()
            update.trigger_times += self._trigger_times.pop(service, [])
        self._dirty.clear()
        return update
