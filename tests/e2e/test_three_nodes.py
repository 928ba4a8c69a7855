"""Service behaviours that need more than one node, in iptables mode (tests/three_node_cases.py).

Every case gets a new three-node cluster whose agents have just started.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from three_node_cases import ThreeNodeCases, populate

from pykubeproxy.sandbox.multinode import MultiNodeCluster

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root"),
]


@pytest.fixture
def mc() -> Iterator[MultiNodeCluster]:
    with MultiNodeCluster() as cluster:
        populate(cluster)
        cluster.start_agents()
        yield cluster


class TestThreeNodes(ThreeNodeCases):
    """iptables mode."""
