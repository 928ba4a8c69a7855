"""What the mode-neutral proxier asks of a proxy mode, and what a mode may answer.

The proxier (watch, trackers, runner, health, metrics) knows nothing of
iptables or IPVS: each mode is a `Backend`, and the one error the proxier must
tell apart, a partial sync that cannot trust the kernel, is defined here.
"""

from __future__ import annotations

from typing import Protocol

from pykubeproxy.model import EndpointsMap, NodeFacts, ServicePortMap, ServicePortName


class KeptChainMissing(RuntimeError):
    """State a partial sync relies on is gone (someone flushed or deleted it): a full
    sync is needed."""


class Backend(Protocol):
    """Makes the kernel match the Services; one implementation per proxy mode."""

    def sync(
        self,
        services: ServicePortMap,
        endpoints: EndpointsMap,
        rewrite: set[ServicePortName] | None,
        node: NodeFacts,
    ) -> None:
        """Full sync when `rewrite` is None, else only those Service ports change.

        Raises KeptChainMissing when a partial sync cannot trust the kernel state.
        """
