"""The proxier: change trackers in, one backend sync per runner call out.

Watch threads call the `on_*` handlers, which only record changes and poke the
runner. The runner thread calls `sync()`, which applies the trackers and asks
the backend (iptables or IPVS) to make the kernel match, naming the Services
that changed so a partial sync can leave the others alone. A full sync happens
at start, every `full_sync_period` (hourly in iptables mode, as upstream's
iptables proxier; every sync period in IPVS mode, whose upstream proxier has no
partial syncs), after a failure, and whenever the backend finds that state a
partial sync relies on is gone (someone flushed or deleted our chains): that is
how external damage is repaired.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from pykubeproxy.backend import Backend, KeptChainMissing
from pykubeproxy.changes import EndpointsChangeTracker, ServiceChangeTracker
from pykubeproxy.conntrack import ConntrackReconciler, reconcile_needed
from pykubeproxy.convert import node_facts, node_is_deleting, slice_service
from pykubeproxy.gcpause import collector_paused
from pykubeproxy.health import ProxyHealth
from pykubeproxy.metrics import Metrics
from pykubeproxy.model import (
    EndpointsMap,
    IPAddress,
    NamespacedName,
    NodeFacts,
    ServicePortMap,
)
from pykubeproxy.topology import local_ready_endpoints

log = logging.getLogger(__name__)

# Upstream's iptables proxier rewrites every chain once an hour (pkg/proxy/util's
# FullSyncPeriod); the syncs in between write only what changed.
HOURLY = 3600.0


Reconcile = Callable[[ServicePortMap, EndpointsMap], object]


class HealthChecks(Protocol):
    """The health-check node port servers (pykubeproxy.healthcheck)."""

    def sync_services(self, ports: Mapping[NamespacedName, int]) -> None: ...
    def sync_endpoints(self, counts: Mapping[NamespacedName, int]) -> None: ...


class Runner(Protocol):
    def run(self) -> None: ...
    def retry_after(self, delay: float) -> None: ...


class Proxier:
    """Turns Service/EndpointSlice/Node events into backend syncs."""

    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        health: ProxyHealth,
        sync_period: float,
        min_sync_period: float,
        node_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        conntrack: Reconcile | None = None,
        health_checks: HealthChecks | None = None,
        node_ip: IPAddress | None = None,
        full_sync_period: float | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.health = health
        self.sync_period = sync_period
        self.min_sync_period = min_sync_period
        self.full_sync_period = sync_period if full_sync_period is None else full_sync_period
        self._clock = clock
        self.conntrack = conntrack or ConntrackReconciler().reconcile
        self.health_checks = health_checks
        self._conntrack_due = True  # a restart reconciles once: flows may have gone stale
        self._orphans: set[NamespacedName] = set()
        self._lock = threading.Lock()
        self.services = ServiceChangeTracker()
        self.endpoints = EndpointsChangeTracker()
        self.runner: Runner | None = None
        self._synced_kinds: set[str] = set()
        self._needs_full = True
        self._last_full: float | None = None
        self._failures = 0
        self._slice_owner: dict[str, NamespacedName] = {}
        self.node = NodeFacts(node_name, ip=node_ip)
        # upstream's bindAddress: this node's primary IP, whatever the Node object says.
        self.node_ip = node_ip

    # --- event handlers (watch threads) -------------------------------------------------

    def _queue(self) -> None:
        self.metrics.last_queued.set(time.time())
        self.health.queued_update()
        if self.runner is not None:
            self.runner.run()

    def on_service(self, key: str, obj: dict[str, Any] | None) -> None:
        namespace, _, name = key.partition("/")
        self.metrics.service_changes.inc()
        with self._lock:
            pending = self.services.update(NamespacedName(namespace, name), obj)
            self.metrics.service_changes_pending.set(self.services.pending())
        if pending:
            self._queue()

    def on_endpoint_slice(self, key: str, obj: dict[str, Any] | None) -> None:
        self.metrics.endpoint_changes.inc()
        with self._lock:
            if obj is not None:
                service = slice_service(obj)
                if service is None:
                    log.warning(
                        "EndpointSlice %s: no kubernetes.io/service-name label; ignored", key
                    )
                    return
                self._slice_owner[key] = service
            else:
                service = self._slice_owner.pop(key, None)
                if service is None:
                    return
            pending = self.endpoints.update(service, key, obj)
            self.metrics.endpoint_changes_pending.set(self.endpoints.pending())
        if pending:
            self._queue()

    def on_node(self, key: str, obj: dict[str, Any] | None) -> None:
        """Eligibility for health, and the zone and IP the rules depend on.

        A change of zone or IP re-renders every Service (a full sync), as a change
        of the Node's labels does upstream.
        """
        eligible = obj is not None and not node_is_deleting(obj)
        if eligible != self.health.node_eligible:
            log.info("node %s: eligible=%s", key.lstrip("/"), eligible)
        self.health.node_eligible = eligible
        facts = node_facts(obj, self.node.name)
        if self.node_ip is not None:
            facts = dataclasses.replace(facts, ip=self.node_ip)
        with self._lock:
            changed = facts != self.node
            if changed:
                log.info("node %s: zone=%r ip=%s", facts.name, facts.zone, facts.ip)
                self.node = facts
                self._needs_full = True
        if changed:
            self._queue()

    def on_synced(self, kind: str) -> None:
        with self._lock:
            self._synced_kinds.add(kind)
        self._queue()

    # --- sync (runner thread) ------------------------------------------------------------

    def ready(self) -> bool:
        return {"Service", "EndpointSlice"} <= self._synced_kinds

    def sync(self) -> None:
        """One sync; failures are counted, logged and retried with backoff."""
        with collector_paused():
            self._sync()

    def _sync(self) -> None:
        if not self.ready():
            log.debug("not syncing until Services and EndpointSlices are listed")
            return
        now = self._clock()
        full = (
            self._needs_full
            or self._last_full is None
            or (now - self._last_full >= self.full_sync_period)
        )
        started = time.monotonic()
        with self._lock:
            changed_services = self.services.apply()
            endpoints = self.endpoints.apply()
            self.metrics.service_changes_pending.set(0)
            self.metrics.endpoint_changes_pending.set(0)
        changed = changed_services | endpoints.changed
        self._conntrack_due |= reconcile_needed(
            endpoints.changed_ports | self.services.changed_ports
        )
        try:
            try:
                self._apply(full, changed)
            except KeptChainMissing as err:
                self.metrics.partial_restore_failures.inc()
                log.warning("partial sync not possible (%s); doing a full sync", err)
                full = True
                self._apply(full, changed)
        except Exception as err:
            self._failures += 1
            self._needs_full = True
            self.metrics.restore_failures.inc()
            delay = min(self.min_sync_period * 2**self._failures, self.sync_period) or 1.0
            log.error("sync failed (%s); retrying in %.1fs with a full sync", err, delay)
            if self.runner is not None:
                self.runner.retry_after(delay)
            return
        elapsed = time.monotonic() - started
        self._failures = 0
        self._needs_full = False
        if full:
            self._last_full = now
        self.metrics.sync_duration.observe(elapsed)
        (self.metrics.full_sync_duration if full else self.metrics.partial_sync_duration).observe(
            elapsed
        )
        self.metrics.last_sync.set(time.time())
        wall = datetime.now(UTC)
        self._sync_health_checks()
        if self._conntrack_due:
            self._conntrack_due = False
            self.conntrack(self.services.service_map, self.endpoints.endpoints_map)
        for trigger in endpoints.trigger_times:
            self.metrics.network_programming.observe(max(0.0, (wall - trigger).total_seconds()))
        self.health.updated()
        self._report_orphans(endpoints.changed | changed_services)
        log.log(
            logging.INFO if full else logging.DEBUG,
            "%s sync: %d services, %d changed, %.3fs",
            "full" if full else "partial",
            len(self.services.service_map),
            len(changed),
            elapsed,
        )

    def _sync_health_checks(self) -> None:
        """Open, move or close health-check node ports, then update what they report."""
        if self.health_checks is None:
            return
        services = self.services.service_map.values()
        self.health_checks.sync_services(
            {svc.name.service: svc.health_check_node_port for svc in services
             if svc.health_check_node_port}
        )  # fmt: skip
        counts = local_ready_endpoints(self.endpoints.endpoints_map, self.node.name)
        self.health_checks.sync_endpoints(counts)

    def _report_orphans(self, changed: set[NamespacedName]) -> None:
        """Log, once, endpoints whose Service does not exist (or is not proxied)."""
        known = {name.service for name in self.services.service_map}
        served = {name.service for name in self.endpoints.endpoints_map}
        for service in changed:
            has_endpoints = service in served
            if has_endpoints and service not in known and service not in self._orphans:
                log.info("EndpointSlices of Service %s ignored: no such proxied Service", service)
                self._orphans.add(service)
            elif service in known or not has_endpoints:
                self._orphans.discard(service)

    def _apply(self, full: bool, changed: set[NamespacedName]) -> None:
        services = self.services.service_map
        rewrite = None if full else {name for name in services if name.service in changed}
        self.backend.sync(services, self.endpoints.endpoints_map, rewrite, self.node)
