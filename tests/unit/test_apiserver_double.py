"""Tests for the API server double: raw HTTP for the wire conventions, and the official
kubernetes client to prove an informer-style agent can talk to it."""

# The client's models make every field Optional and some helpers are untyped; asserting
# each away would bury the tests, so those checks are off for this file only.
# mypy: disable-error-code="union-attr, index, no-untyped-call, arg-type, attr-defined"

from __future__ import annotations

import ctypes
import email.message
import fcntl
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client import ApiException

from pykubeproxy.sandbox.apiserver import (
    ApiError,
    ApiServerDouble,
    merge_patch,
    parse_field_selector,
    parse_label_selector,
)

Obj = dict[str, Any]
REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def svc(name: str, ns: str = "default", labels: dict[str, str] | None = None) -> Obj:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def node(name: str, labels: dict[str, str] | None = None) -> Obj:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"podCIDR": "10.0.0.0/24"}}


def slice_(name: str, service: str, ns: str = "default") -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.1.5"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def rv_of(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


def call(
    server: ApiServerDouble,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Obj, email.message.Message]:
    """One HTTP request; returns (status, JSON body, headers) for errors too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"Content-Type": content_type, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read()), err.headers


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition the server reaches asynchronously (not a performance check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class RawWatch:
    """A watch read line by line with http.client, to see the exact wire format."""

    def __init__(self, server: ApiServerDouble, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()  # headers are sent once the watch is registered
        assert self.resp.status == 200
        assert self.resp.getheader("Transfer-Encoding") == "chunked"
        self.buffer = b""

    def readline(self) -> bytes:
        """One line, or b"" at the clean end.  read1() raises IncompleteRead when the stream
        is cut (readline() would hide that behind peek())."""
        while b"\n" not in self.buffer:
            data = self.resp.read1(65536)
            if not data:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def next(self) -> Obj:
        line = self.readline()
        assert line.endswith(b"\n"), f"stream ended: {line!r}"
        event: Obj = json.loads(line)
        return event

    def next_non_bookmark(self) -> Obj:
        while (event := self.next())["type"] == "BOOKMARK":
            pass
        return event

    def rest(self) -> list[Obj]:
        """Read to the clean end of the stream (http.client raises if it is cut)."""
        events = []
        while line := self.readline():
            events.append(json.loads(line))
        return events

    def close(self) -> None:
        self.conn.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("apiserver-double")]
    assert leaked == []


@pytest.fixture
def server() -> Iterator[ApiServerDouble]:
    with ApiServerDouble(bookmark_interval=0.2) as srv:
        yield srv


@pytest.fixture
def watch(server: ApiServerDouble) -> Iterator[Callable[[str], RawWatch]]:
    opened: list[RawWatch] = []

    def open_watch(path: str) -> RawWatch:
        opened.append(RawWatch(server, path))
        return opened[-1]

    yield open_watch
    for w in opened:
        w.close()


@pytest.fixture
def api(server: ApiServerDouble) -> Iterator[k8s.ApiClient]:
    configuration = k8s.Configuration()
    configuration.host = server.url
    with k8s.ApiClient(configuration) as api_client:
        yield api_client


# --------------------------------------------------------------------------- store semantics


def test_resource_version_is_one_global_monotonic_counter(server: ApiServerDouble) -> None:
    start = server.resource_version
    rvs = [
        rv_of(server.create("services", svc("a"))),
        rv_of(server.create("nodes", node("n1"))),
        rv_of(server.create("endpointslices", slice_("a-1", "a"))),
        rv_of(server.patch("services", "default", "a", {"metadata": {"labels": {"x": "y"}}})),
        rv_of(server.delete("nodes", None, "n1")),
    ]
    assert rvs == list(range(start + 1, start + 6))
    status, body, _ = call(server, "GET", "/api/v1/services")
    assert status == 200 and body["metadata"]["resourceVersion"] == str(rvs[-1])


def test_server_managed_metadata_and_generation(server: ApiServerDouble) -> None:
    body = svc("a")
    body["metadata"].update(uid="client-uid", resourceVersion="999")
    created = server.create("services", body)
    meta = created["metadata"]
    assert created["kind"] == "Service" and created["apiVersion"] == "v1"
    assert meta["uid"] != "client-uid" and meta["resourceVersion"] != "999"
    assert meta["generation"] == 1 and meta["creationTimestamp"].endswith("Z")

    relabelled = server.patch("services", "default", "a", {"metadata": {"labels": {"l": "1"}}})
    assert relabelled["metadata"]["generation"] == 1  # metadata changes keep the generation
    respec = server.patch("services", "default", "a", {"spec": {"clusterIP": "10.96.0.11"}})
    assert respec["metadata"]["generation"] == 2
    assert respec["metadata"]["uid"] == meta["uid"]
    noop = server.patch("services", "default", "a", {"spec": {"clusterIP": "10.96.0.11"}})
    assert noop["metadata"]["resourceVersion"] == respec["metadata"]["resourceVersion"]

    # namespace defaulting: from the path, else "default"; cluster-scoped kinds drop it
    assert server.create("services", {"metadata": {"name": "b"}})["metadata"]["namespace"] == (
        "default"
    )
    status, posted, _ = call(
        server, "POST", "/api/v1/namespaces/ns1/services", {"metadata": {"name": "c"}}
    )
    assert status == 201 and posted["metadata"]["namespace"] == "ns1"
    status, err, _ = call(server, "POST", "/api/v1/namespaces/ns1/services", svc("d", ns="ns2"))
    assert status == 400 and err["reason"] == "BadRequest"
    assert (
        "namespace"
        not in server.create("nodes", {"metadata": {"name": "n", "namespace": "x"}})["metadata"]
    )
    generated = server.create("events", {"metadata": {"generateName": "ev-"}, "reason": "Test"})
    assert (
        generated["metadata"]["name"].startswith("ev-") and len(generated["metadata"]["name"]) == 8
    )
    with pytest.raises(ApiError) as missing_name:
        server.create("services", {"metadata": {}})
    assert missing_name.value.code == 422


def test_crud_over_http_with_status_errors(server: ApiServerDouble) -> None:
    status, created, _ = call(server, "POST", "/api/v1/namespaces/default/services", svc("web"))
    assert status == 201 and created["kind"] == "Service"

    status, err, _ = call(server, "POST", "/api/v1/namespaces/default/services", svc("web"))
    assert (status, err["reason"], err["code"]) == (409, "AlreadyExists", 409)
    assert err["kind"] == "Status" and err["status"] == "Failure"
    assert err["message"] == 'services "web" already exists'
    assert err["details"] == {"name": "web", "kind": "services"}

    path = "/api/v1/namespaces/default/services/web"
    status, got, _ = call(server, "GET", path)
    assert status == 200 and got == created

    stale = dict(got, metadata={**got["metadata"], "resourceVersion": "1"})
    status, err, _ = call(server, "PUT", path, stale)
    assert (status, err["reason"]) == (409, "Conflict")
    assert "the object has been modified" in err["message"]

    fresh = {**got, "spec": {**got["spec"], "type": "ClusterIP"}}
    status, replaced, _ = call(server, "PUT", path, fresh)
    assert status == 200 and replaced["spec"]["type"] == "ClusterIP"
    assert rv_of(replaced) > rv_of(got)

    status, err, _ = call(server, "PUT", "/api/v1/namespaces/default/services/nope", svc("nope"))
    assert (status, err["reason"]) == (404, "NotFound")

    status, deleted, _ = call(server, "DELETE", path)
    assert status == 200 and deleted["metadata"]["name"] == "web"
    assert rv_of(deleted) == server.resource_version > rv_of(replaced)

    status, err, _ = call(server, "GET", path)
    assert err == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services "web" not found',
        "reason": "NotFound",
        "details": {"name": "web", "kind": "services"},
        "code": 404,
    }
    status, err, _ = call(server, "GET", "/apis/discovery.k8s.io/v1/namespaces/x/endpointslices/y")
    assert err["message"] == 'endpointslices.discovery.k8s.io "y" not found'
    assert err["details"]["group"] == "discovery.k8s.io"
    with pytest.raises(ApiError) as excinfo:
        server.get("services", "default", "web")
    assert excinfo.value.code == 404 and excinfo.value.reason == "NotFound"
    with pytest.raises(ValueError):
        server.get("pods", "default", "x")


def test_merge_patch_over_http(server: ApiServerDouble) -> None:
    server.create("services", svc("web", labels={"keep": "1", "drop": "1"}))
    path = "/api/v1/namespaces/default/services/web"
    patch = {"metadata": {"labels": {"drop": None, "new": "2"}}, "spec": {"type": "NodePort"}}
    status, patched, _ = call(server, "PATCH", path, patch, "application/merge-patch+json")
    assert status == 200
    assert patched["metadata"]["labels"] == {"keep": "1", "new": "2"}
    assert patched["spec"]["type"] == "NodePort" and patched["spec"]["clusterIP"] == "10.96.0.10"

    status, patched, _ = call(
        server, "PATCH", path, {"spec": {"type": None}}, "application/strategic-merge-patch+json"
    )
    assert status == 200 and "type" not in patched["spec"]

    stale = {"metadata": {"resourceVersion": "2"}, "spec": {"type": "LoadBalancer"}}
    status, err, _ = call(server, "PATCH", path, stale, "application/merge-patch+json")
    assert (status, err["reason"]) == (409, "Conflict")

    ops = [{"op": "add", "path": "/metadata/labels/x", "value": "y"}]
    status, err, _ = call(server, "PATCH", path, ops, "application/json-patch+json")
    assert (status, err["reason"]) == (415, "UnsupportedMediaType")


def test_merge_patch_follows_rfc7386() -> None:
    assert merge_patch({"a": "b", "c": {"d": "e", "f": "g"}}, {"a": "z", "c": {"f": None}}) == {
        "a": "z",
        "c": {"d": "e"},
    }
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}  # lists are replaced
    assert merge_patch({"a": {"b": "c"}}, {"a": "scalar"}) == {"a": "scalar"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


# --------------------------------------------------------------------------- selectors

LABELS = {
    "web": {"app": "web", "tier": "front", "prio": "5"},
    "db": {"app": "db", "tier": "back"},
    "bare": {},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", {"web", "db", "bare"}),
        ("app=web", {"web"}),
        ("app==web", {"web"}),
        ("app!=web", {"db", "bare"}),
        ("app in (web, db)", {"web", "db"}),
        ("app notin (web)", {"db", "bare"}),
        ("tier", {"web", "db"}),
        ("!tier", {"bare"}),
        ("app=web,tier=front", {"web"}),
        ("app in (web,db),tier notin (back)", {"web"}),
        ("prio>3", {"web"}),
        ("prio<3", set()),
        (" app = db , !prio ", {"db"}),
    ],
)
def test_label_selector_syntax(selector: str, expected: set[str]) -> None:
    match = parse_label_selector(selector)
    assert {name for name, labels in LABELS.items() if match(labels)} == expected


@pytest.mark.parametrize("selector", ["app=", "=web", "app in web", "app in ()", "a,,b", "!"])
def test_label_selector_errors_are_400(selector: str) -> None:
    if selector == "app=":  # an empty value is legal: it matches the empty label value
        assert parse_label_selector(selector)({"app": ""})
        return
    with pytest.raises(ApiError) as excinfo:
        parse_label_selector(selector)
    assert excinfo.value.code == 400


def test_selectors_filter_lists(server: ApiServerDouble) -> None:
    for name, labels in LABELS.items():
        server.create("services", svc(name, ns="ns1" if name == "db" else "default", labels=labels))
        server.create("nodes", node(f"node-{name}", labels))
    query = "/api/v1/services?labelSelector=app%20in%20(web%2Cdb)%2C!prio"
    assert [i["metadata"]["name"] for i in call(server, "GET", query)[1]["items"]] == ["db"]
    _, body, _ = call(server, "GET", "/api/v1/services?fieldSelector=metadata.namespace!=ns1")
    assert [i["metadata"]["name"] for i in body["items"]] == ["bare", "web"]
    status, body, _ = call(server, "GET", "/api/v1/nodes?fieldSelector=metadata.name%3D%3Dnode-db")
    assert [i["metadata"]["name"] for i in body["items"]] == ["node-db"]
    assert "kind" not in body["items"][0]  # list items carry no kind/apiVersion
    assert body["kind"] == "NodeList" and body["apiVersion"] == "v1"
    _, scoped, _ = call(server, "GET", "/api/v1/namespaces/ns1/services")
    assert [i["metadata"]["name"] for i in scoped["items"]] == ["db"]

    status, err, _ = call(server, "GET", "/api/v1/nodes?fieldSelector=spec.podCIDR%3Dx")
    assert (status, err["message"]) == (400, "field label not supported: spec.podCIDR")
    status, err, _ = call(server, "GET", "/api/v1/nodes?labelSelector=a%20in%20b")
    assert (status, err["reason"]) == (400, "BadRequest")
    assert parse_field_selector("metadata.name=x")({"metadata": {"name": "x"}})


# --------------------------------------------------------------------------- list paging / RV


def test_paging_returns_every_item_exactly_once_from_one_snapshot(
    server: ApiServerDouble,
) -> None:
    expected = set()
    for i in range(10):
        ns = f"ns{i % 3}"
        server.create("services", svc(f"svc{i}", ns=ns))
        expected.add(f"{ns}/svc{i}")
    seen: list[str] = []
    token, list_rv = "", None
    for page in range(10):
        suffix = f"&continue={token}" if token else ""
        status, body, _ = call(server, "GET", f"/api/v1/services?limit=3{suffix}")
        assert status == 200
        list_rv = list_rv or body["metadata"]["resourceVersion"]
        assert body["metadata"]["resourceVersion"] == list_rv  # every page is the same snapshot
        seen += [f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in body["items"]]
        if page == 0:
            assert body["metadata"]["remainingItemCount"] == 7
            # changes after the first page must not leak into later pages
            server.create("services", svc("zzz-late", ns="ns2"))
            server.delete("services", "ns2", "svc8")
        token = body["metadata"].get("continue", "")
        if not token:
            break
    assert len(seen) == len(set(seen)) == 10
    assert set(seen) == expected


def test_expired_continue_token_is_410(server: ApiServerDouble) -> None:
    server.create("services", svc("a"))
    server.create("services", svc("b"))
    _, first, _ = call(server, "GET", "/api/v1/services?limit=1")
    token = first["metadata"]["continue"]
    server.create("services", svc("c"))
    server.compact()
    status, err, _ = call(server, "GET", f"/api/v1/services?limit=1&continue={token}")
    assert (status, err["reason"], err["code"]) == (410, "Expired", 410)
    status, err, _ = call(server, "GET", "/api/v1/services?limit=1&continue=garbage!")
    assert status == 400


def test_list_resource_version_semantics(server: ApiServerDouble) -> None:
    server.create("services", svc("a"))
    old = server.resource_version
    server.create("services", svc("b"))

    def names(query: str) -> list[str]:
        status, body, _ = call(server, "GET", f"/api/v1/services?{query}")
        assert status == 200, body
        return [i["metadata"]["name"] for i in body["items"]]

    assert names(f"resourceVersion={old}&resourceVersionMatch=Exact") == ["a"]
    assert names(f"resourceVersion={old}&limit=10") == ["a"]  # legacy: limit means exact
    assert names(f"resourceVersion={old}") == ["a", "b"]  # NotOlderThan: served latest
    assert names("resourceVersion=0") == ["a", "b"]
    assert names("resourceVersion=0&limit=1") == ["a", "b"]  # the watch cache ignores limit

    status, err, _ = call(server, "GET", f"/api/v1/services?resourceVersion={old + 100}")
    assert (status, err["reason"]) == (504, "Timeout")
    status, err, _ = call(server, "GET", "/api/v1/services?resourceVersionMatch=Exact")
    assert status == 400
    server.compact()
    status, err, _ = call(
        server, "GET", f"/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"
    )
    assert (status, err["reason"]) == (410, "Expired")


# --------------------------------------------------------------------------- watch


def test_list_then_watch_sees_exactly_the_later_events(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    server.create("services", svc("a"))
    server.create("services", svc("b"))
    list_rv = int(call(server, "GET", "/api/v1/services")[1]["metadata"]["resourceVersion"])
    server.create("services", svc("c"))
    server.patch("services", "default", "a", {"metadata": {"labels": {"v": "2"}}})
    server.delete("services", "default", "b")
    server.create("nodes", node("n1"))  # other kinds never show up

    w = watch(f"/api/v1/services?watch=true&resourceVersion={list_rv}")
    events = [w.next() for _ in range(3)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "c"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    rvs = [rv_of(e["object"]) for e in events]
    assert list_rv < rvs[0] < rvs[1] < rvs[2]
    assert all(e["object"]["kind"] == "Service" for e in events)
    assert all(e["object"]["apiVersion"] == "v1" for e in events)

    server.create("services", svc("d"))
    live = w.next()
    assert (live["type"], live["object"]["metadata"]["name"]) == ("ADDED", "d")
    assert rv_of(live["object"]) == server.resource_version


@pytest.mark.parametrize("rv_query", ["", "&resourceVersion=0"])
def test_watch_without_rv_starts_with_synthetic_added(
    server: ApiServerDouble, watch: Callable[[str], RawWatch], rv_query: str
) -> None:
    server.create("endpointslices", slice_("web-1", "web"))
    server.create("endpointslices", slice_("web-2", "web", ns="other"))
    w = watch(f"/apis/discovery.k8s.io/v1/endpointslices?watch=1{rv_query}")
    first = [w.next(), w.next()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in first] == [
        ("ADDED", "web-1"),
        ("ADDED", "web-2"),
    ]
    assert first[0]["object"]["apiVersion"] == "discovery.k8s.io/v1"
    assert first[0]["object"]["kind"] == "EndpointSlice"


def test_watch_from_compacted_rv_gets_one_410_error_event(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    server.create("services", svc("a"))
    old = server.resource_version
    server.create("services", svc("b"))
    server.compact()
    w = watch(f"/api/v1/services?watch=true&resourceVersion={old}")
    events = w.rest()
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"] == f"too old resource version: {old} ({server.resource_version})"
    future = server.resource_version + 10
    status, err, _ = call(server, "GET", f"/api/v1/services?watch=1&resourceVersion={future}")
    assert (status, err["reason"]) == (504, "Timeout")
    # the compaction point itself is still watchable
    w2 = watch(f"/api/v1/services?watch=true&resourceVersion={server.resource_version}")
    server.create("services", svc("c"))
    assert w2.next()["object"]["metadata"]["name"] == "c"


def test_watch_reports_selector_transitions(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    server.create("services", svc("web", labels={"app": "web"}))
    w = watch("/api/v1/namespaces/default/services?watch=true&labelSelector=app%3Dweb")
    assert w.next()["type"] == "ADDED"

    moved_out = server.patch("services", "default", "web", {"metadata": {"labels": {"app": "x"}}})
    event = w.next()
    assert event["type"] == "DELETED"
    assert (
        event["object"]["metadata"]["resourceVersion"] == moved_out["metadata"]["resourceVersion"]
    )
    server.create("services", svc("other", labels={"app": "x"}))  # never matches
    server.create("services", svc("web", ns="elsewhere", labels={"app": "web"}))  # other ns
    server.patch("services", "default", "web", {"metadata": {"labels": {"app": "web"}}})
    assert w.next()["type"] == "ADDED"
    server.patch("services", "default", "web", {"spec": {"type": "NodePort"}})
    assert w.next()["type"] == "MODIFIED"
    server.delete("services", "default", "web")
    assert w.next()["type"] == "DELETED"

    nodes = watch("/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dn2")
    legacy = watch("/api/v1/watch/nodes/n3")  # the old /watch/ path for one object
    for name in ("n1", "n2", "n3"):
        server.create("nodes", node(name))
    assert nodes.next()["object"]["metadata"]["name"] == "n2"
    assert legacy.next()["object"]["metadata"]["name"] == "n3"


def test_watch_timeout_ends_stream_cleanly(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    w = watch("/api/v1/services?watch=true&timeoutSeconds=1")
    assert server.watch_count() == 1
    assert w.rest() == []  # raises IncompleteRead if the stream were cut instead
    wait_for(lambda: server.watch_count() == 0)


def test_watch_bookmarks_carry_the_current_rv(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    server.create("services", svc("a"))
    w = watch("/api/v1/services?watch=true&allowWatchBookmarks=true")
    assert w.next()["type"] == "ADDED"
    server.create("nodes", node("n1"))  # bumps the global RV without a service event
    bookmark = w.next()
    assert bookmark == {
        "type": "BOOKMARK",
        "object": {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(server.resource_version)},
        },
    }
    no_bookmarks = watch("/api/v1/services?watch=true&timeoutSeconds=1")
    assert [e["type"] for e in no_bookmarks.rest()] == ["ADDED"]


def test_drop_watches_cuts_streams_abruptly(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    watches = [watch("/api/v1/services?watch=true"), watch("/api/v1/nodes?watch=true")]
    assert server.watch_count() == 2
    assert server.drop_watches() == 2
    for w in watches:
        with pytest.raises(http.client.IncompleteRead):
            w.rest()
    assert server.watch_count() == 0
    again = watch("/api/v1/services?watch=true")  # the server keeps serving
    server.create("services", svc("a"))
    assert again.next()["type"] == "ADDED"


def test_client_hanging_up_frees_the_watch(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    w = watch("/api/v1/services?watch=true")
    assert server.watch_count() == 1
    w.close()
    wait_for(lambda: server.watch_count() == 0)


def test_many_concurrent_watchers_all_get_the_event(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    watchers = [watch("/api/v1/services?watch=true") for _ in range(25)]
    assert server.watch_count() == 25
    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda i: server.create("services", svc(f"s{i}")), range(5)))
    for w in watchers:
        assert sorted(w.next()["object"]["metadata"]["name"] for _ in range(5)) == [
            f"s{i}" for i in range(5)
        ]


# --------------------------------------------------------------------------- fault injection


def test_set_failure_answers_every_request(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    server.set_failure(503)
    status, err, _ = call(server, "GET", "/api/v1/services")
    assert (status, err["reason"], err["kind"]) == (503, "ServiceUnavailable", "Status")
    with pytest.raises(ApiException) as excinfo:
        k8s.CoreV1Api(api).list_node()
    assert excinfo.value.status == 503

    server.set_failure(429, retry_after=2)
    status, err, headers = call(server, "GET", "/healthz")
    assert (status, err["reason"], headers["Retry-After"]) == (429, "TooManyRequests", "2")
    assert err["details"]["retryAfterSeconds"] == 2

    server.set_failure(None)
    assert call(server, "GET", "/api/v1/services")[0] == 200
    assert server.create("services", svc("a"))  # the test API is never affected


def test_pause_refuses_connections_until_resume(
    server: ApiServerDouble, watch: Callable[[str], RawWatch]
) -> None:
    url = server.url
    w = watch("/api/v1/services?watch=true")
    server.pause()
    with pytest.raises(http.client.IncompleteRead):
        w.rest()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    server.create("services", svc("while-down"))
    server.resume()
    assert server.url == url
    _, body, _ = call(server, "GET", "/api/v1/services")
    assert [i["metadata"]["name"] for i in body["items"]] == ["while-down"]


def test_requests_are_recorded(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    rv = core.list_service_for_all_namespaces(label_selector="app=web").metadata.resource_version
    for _ in k8s_watch.Watch().stream(
        core.list_service_for_all_namespaces,
        resource_version=rv,
        timeout_seconds=1,
        allow_watch_bookmarks=True,
    ):
        pass
    listed, watched = server.requests[-2:]
    assert (listed.method, listed.path) == ("GET", "/api/v1/services")
    assert listed.query["labelSelector"] == "app=web"
    assert watched.query["resourceVersion"] == rv
    assert watched.query["timeoutSeconds"] == "1"
    assert watched.query["allowWatchBookmarks"].lower() == "true"
    assert watched.query["watch"].lower() == "true"


# --------------------------------------------------------------------------- kubernetes client


def test_kubernetes_client_lists(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    server.create("services", svc("plain"))
    server.create("services", svc("headless", labels={"service.kubernetes.io/headless": ""}))
    server.create(
        "services", svc("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"})
    )
    server.create("endpointslices", slice_("plain-abc", "plain"))
    server.create("nodes", node("n1"))
    server.create("nodes", node("n2"))

    core = k8s.CoreV1Api(api)
    services = core.list_service_for_all_namespaces(
        label_selector="!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
    )
    assert [s.metadata.name for s in services.items] == ["plain"]
    assert services.items[0].spec.ports[0].port == 80
    assert services.metadata.resource_version == str(server.resource_version)

    slices = k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces()
    assert slices.items[0].endpoints[0].addresses == ["10.0.1.5"]
    assert slices.items[0].endpoints[0].conditions.ready is True
    assert slices.items[0].metadata.labels["kubernetes.io/service-name"] == "plain"

    nodes = core.list_node(field_selector="metadata.name=n1")
    assert [n.metadata.name for n in nodes.items] == ["n1"]

    pages = core.list_node(limit=1)
    rest = core.list_node(limit=1, _continue=pages.metadata._continue)
    assert [pages.items[0].metadata.name, rest.items[0].metadata.name] == ["n1", "n2"]

    assert k8s.VersionApi(api).get_code().git_version == "v1.31.0"
    assert k8s.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in k8s.ApisApi(api).get_api_versions().groups}
    assert groups == {"discovery.k8s.io", "events.k8s.io"}


def test_kubernetes_client_crud_and_events(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    created = core.create_namespaced_service("default", svc("web"))
    patched = core.patch_namespaced_service("web", "default", {"metadata": {"labels": {"a": "b"}}})
    assert patched.metadata.labels == {"a": "b"}
    created.spec.type = "NodePort"
    with pytest.raises(ApiException) as excinfo:
        core.replace_namespaced_service("web", "default", created)  # stale resourceVersion
    assert excinfo.value.status == 409
    assert json.loads(excinfo.value.body)["reason"] == "Conflict"
    core.delete_namespaced_service("web", "default")
    with pytest.raises(ApiException) as excinfo:
        core.read_namespaced_service("web", "default")
    assert excinfo.value.status == 404

    involved = k8s.V1ObjectReference(kind="Node", name="n1")
    core.create_namespaced_event(
        "default",
        k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(name="n1.1"), involved_object=involved, reason="Starting"
        ),
    )
    events_api = k8s.EventsV1Api(api)
    events_api.create_namespaced_event(
        "kube-system",
        k8s.EventsV1Event(
            metadata=k8s.V1ObjectMeta(name="n1.2"),
            event_time=datetime.now(UTC),
            reason="Starting",
            action="Start",
            reporting_controller="pykubeproxy",
            reporting_instance="n1",
            regarding=involved,
        ),
    )
    events_api.patch_namespaced_event(
        "n1.2",
        "kube-system",
        {"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:00.000000Z"}},
    )
    # one Event store serves both APIs, converting field names like the real server
    stored = server.list("events")
    assert [e["metadata"]["name"] for e in stored] == ["n1.1", "n1.2"]
    assert stored[1]["reportingComponent"] == "pykubeproxy"
    assert stored[1]["involvedObject"] == {"kind": "Node", "name": "n1"}
    core_events = core.list_event_for_all_namespaces().items
    assert [e.involved_object.name for e in core_events] == ["n1", "n1"]
    # old-style events lack eventTime, which the client's EventsV1Event model requires
    listed = events_api.list_namespaced_event("kube-system")
    assert [(e.metadata.name, e.series.count) for e in listed.items] == [("n1.2", 2)]
    assert listed.items[0].regarding.name == "n1"
    assert listed.items[0].reporting_controller == "pykubeproxy"


def test_kubernetes_client_watch(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(api)
    server.create("services", svc("before"))
    rv = core.list_service_for_all_namespaces().metadata.resource_version
    server.create("services", svc("after"))
    w = k8s_watch.Watch()
    events = list(
        w.stream(
            core.list_service_for_all_namespaces,
            resource_version=rv,
            timeout_seconds=1,
            allow_watch_bookmarks=True,
        )
    )
    assert events[0]["type"] == "ADDED"
    assert isinstance(events[0]["object"], k8s.V1Service)
    assert events[0]["object"].metadata.name == "after"
    assert {e["type"] for e in events[1:]} == {"BOOKMARK"}
    assert w.resource_version == str(server.resource_version)

    server.compact()
    server.create("services", svc("later"))
    with pytest.raises(ApiException) as excinfo:  # retried once by the client, then raised
        for _ in k8s_watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=rv
        ):
            pass
    assert excinfo.value.status == 410


def test_kubernetes_client_raw_stream(server: ApiServerDouble, api: k8s.ApiClient) -> None:
    server.create("nodes", node("n1"))
    resp = k8s.CoreV1Api(api).list_node(watch=True, timeout_seconds=1, _preload_content=False)
    try:
        lines = [json.loads(line) for line in resp]
    finally:
        resp.release_conn()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("ADDED", "n1")]
    assert lines[0]["object"]["kind"] == "Node"


def test_tls_and_token_with_kubeconfig(tmp_path: Path) -> None:
    with ApiServerDouble(tls=True, token="s3cret") as server:
        assert server.url.startswith("https://127.0.0.1:")
        assert server.ca_cert_path is not None and server.ca_cert_path.exists()
        server.create("nodes", node("n1"))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
            nodes = k8s.CoreV1Api(api_client).list_node()
            assert [n.metadata.name for n in nodes.items] == ["n1"]

        config = json.loads(kubeconfig.read_text())
        config["users"][0]["user"]["token"] = "wrong"
        (tmp_path / "bad").write_text(json.dumps(config))
        with k8s_config.new_client_from_config(config_file=str(tmp_path / "bad")) as api_client:
            with pytest.raises(ApiException) as excinfo:
                k8s.CoreV1Api(api_client).list_node()
            assert excinfo.value.status == 401

        context = ssl.create_default_context(cafile=str(server.ca_cert_path))
        status, err, _ = call(server, "GET", "/api/v1/nodes", context=context)
        assert (status, err["reason"]) == (401, "Unauthorized")
        auth = {"Authorization": "Bearer s3cret"}
        assert call(server, "GET", "/version", headers=auth, context=context)[0] == 200
        assert server.get("nodes", None, "n1")  # the test API needs no token
        ca_path = server.ca_cert_path
    assert not ca_path.exists()  # the throwaway CA is removed on stop()


def test_plain_kubeconfig(server: ApiServerDouble, tmp_path: Path) -> None:
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    with k8s_config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        assert k8s.CoreV1Api(api_client).list_node().items == []


# --------------------------------------------------------------------------- sockets & CLI


def test_serves_on_a_given_socket(tmp_path: Path) -> None:
    unbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with (
        ApiServerDouble(sock=unbound) as server,
        urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp,
    ):
        assert resp.read() == b"ok"
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))
    with ApiServerDouble(sock=bound) as server:
        assert server.port == bound.getsockname()[1]
        server.pause()
        server.resume()
        assert call(server, "GET", "/api/v1/nodes")[0] == 200


def _enter_new_netns() -> None:
    """Executor initializer: move this worker thread into a fresh netns with lo up."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with socket.socket() as s:  # SIOCSIFFLAGS lo: IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40))


def _netns_available() -> bool:
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            pool.submit(_enter_new_netns).result()
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _netns_available(), reason="needs CAP_SYS_ADMIN for unshare(CLONE_NEWNET)")
def test_socket_in_another_netns_survives_pause_resume() -> None:
    def healthz(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return b"".join(iter(lambda: conn.recv(4096), b""))

    with ThreadPoolExecutor(max_workers=1, initializer=_enter_new_netns) as inside:
        sock = inside.submit(socket.socket).result()  # created in the namespace
        with ApiServerDouble(sock=sock) as server:
            assert inside.submit(healthz, server.port).result().endswith(b"\r\n\r\nok")
            server.pause()
            with pytest.raises(ConnectionRefusedError):
                inside.submit(healthz, server.port).result()
            server.resume()  # must re-bind inside the namespace, not in ours
            assert inside.submit(healthz, server.port).result().endswith(b"\r\n\r\nok")


def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykubeproxy.sandbox.apiserver", "--listen", "127.0.0.1:0",
         "--kubeconfig-out", str(kubeconfig), "--token", "t"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(kubeconfig.exists, timeout=20)
        url = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        request = urllib.request.Request(url + "/healthz", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.read() == b"ok"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert "serving on http://127.0.0.1:" in stderr
