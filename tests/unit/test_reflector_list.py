"""The reflector's list, against the API server double: objects are handed on while the
cyclic collector is paused (a list of 10,000 objects allocates millions of containers),
and the collector runs again once the list is read."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import objects as o

from pykubeproxy import kube
from pykubeproxy.sandbox.apiserver import ApiServerDouble


def test_a_list_is_read_with_the_collector_paused(tmp_path: Path) -> None:
    seen: dict[str, bool] = {}

    def handler(key: str, obj: dict[str, Any] | None) -> None:
        seen[key] = gc.isenabled()

    with ApiServerDouble() as server:
        for name in ("a", "b"):
            server.create("services", o.service("ns", name, "10.96.0.10", [o.port("p", 80)]))
        client = kube.api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")), "")
        reflector = kube.Reflector(
            client, kube.services_kind(), handler, lambda: None, threading.Event()
        )
        gc.enable()
        reflector.list()
    assert seen == {"ns/a": False, "ns/b": False}
    assert gc.isenabled()
