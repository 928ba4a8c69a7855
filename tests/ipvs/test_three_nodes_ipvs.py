"""Service behaviours that need more than one node, in IPVS mode (tests/three_node_cases.py).

Runs only inside the VM (tests/test_ipvs_vm.py): the cases of the iptables-mode
tests/e2e/test_three_nodes.py against three agents in ``--proxy-mode ipvs``; where
upstream's IPVS proxier behaves otherwise, the case says so and expects upstream's IPVS
outcome (the docstring of tests/three_node_cases.py lists the differences). Python runs
emulated there and three agents take minutes to start, so they start once for the module
and each case gets the cluster reset (``three_node_cases.reset``); waits are long.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from three_node_cases import ThreeNodeCases, populate, reset

from pykubeproxy.sandbox.multinode import MultiNodeCluster

pytestmark = pytest.mark.ipvs

SLOW = 600.0  # seconds a sync may take: three agents on one emulated CPU


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    with MultiNodeCluster(mode="ipvs", sync_timeout=SLOW) as cluster:
        populate(cluster)
        cluster.start_agents()
        cluster.wait_synced()
        yield cluster


@pytest.fixture
def mc(cluster: MultiNodeCluster) -> MultiNodeCluster:
    reset(cluster)
    return cluster


class TestThreeNodesIpvs(ThreeNodeCases):
    """IPVS mode."""
