"""Rules built by python-iptables itself: the reference every faster path is checked
against, and the path for rules nothing else can encode.

The agent's modules take python-iptables (`iptc`) from here, loaded without distutils: it
imports distutils only to ask for the site-packages path, and falls back to sysconfig when
distutils is missing. Where setuptools is installed, importing distutils imports all of
setuptools instead, most of a second of every start.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from pykubeproxy.iptables.ruleset import Argv


def _load_python_iptables() -> Any:
    hidden = [name for name in ("distutils", "distutils.sysconfig") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    try:
        import iptc
    finally:
        for name in hidden:
            del sys.modules[name]
    return iptc


iptc = _load_python_iptables()
is_table_available = iptc.ip4tc.is_table_available


class _FakeChains:
    """Stands in for python-iptables' table list while templates are built."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = names

    def is_chain(self, name: str) -> bool:
        return name in self.names


_TABLES_ASKED = iptc.Rule.__dict__["tables"]  # python-iptables' own Rule.tables


@contextmanager
def resolving_chains(names: Collection[str]) -> Iterator[None]:
    """Make python-iptables treat `names` as existing chains, without the kernel.

    python-iptables decides whether ``-j NAME`` is a jump by asking every table
    of the current network namespace whether chain NAME exists (``Rule.tables``
    opens them all). Templates jump to made-up chains, and learning must not
    touch any namespace's tables, so for the duration of a build the question
    is answered from `names`. Not thread-safe: the applier is single-threaded.
    """
    iptc.Rule.tables = property(lambda rule: [_FakeChains(names)])
    try:
        yield
    finally:
        iptc.Rule.tables = _TABLES_ASKED


def _open_tables() -> None:
    """Give every table singleton a libiptc handle.

    python-iptables decides whether ``-j NAME`` is a jump by asking every table
    whether NAME is a chain; asking a table the applier has closed would pass
    libiptc a NULL handle and crash the process. Under `resolving_chains` no
    table is asked, so none is read (at 10,000 Services, reading nat costs a
    quarter of a second, and the encoder checks each saved shape this way).
    """
    if iptc.Rule.__dict__["tables"] is not _TABLES_ASKED:
        return
    for name in iptc.Table.ALL:
        if is_table_available(name):
            table = iptc.Table(name)
            if table._handle is None:
                table.refresh()


def build_rule(argv: Argv) -> Any:
    """A python-iptables Rule from kube-proxy-style arguments (``-A CHAIN`` excluded)."""
    _open_tables()
    rule = iptc.Rule()
    module: Any = None
    negate = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "!":
            negate = True
            i += 1
            continue
        prefix = "!" if negate else ""
        negate = False
        if arg in ("-p", "-s", "-d"):
            setattr(rule, {"-p": "protocol", "-s": "src", "-d": "dst"}[arg], prefix + argv[i + 1])
            i += 2
        elif arg == "-m":
            module = rule.create_match(argv[i + 1])
            i += 2
        elif arg == "-j":
            module = rule.create_target(argv[i + 1])
            i += 2
        elif arg.startswith("--") and module is not None:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("-") and argv[i] != "!":
                values.append(argv[i])
                i += 1
            if len(values) > 1:  # e.g. --match-set NAME dst,dst: separate arguments
                module.set_parameter(arg[2:], [prefix, *values] if prefix else values)
            else:
                module.set_parameter(arg[2:], prefix + "".join(values))
        else:
            raise ValueError(f"unsupported rule argument {arg!r} in {argv!r}")
    if rule.target is None:
        rule.create_target("")
    return rule


def built_entry(argv: Argv) -> Any:
    """The entry python-iptables builds for a rule (slow: ~225 µs)."""
    rule = build_rule(argv)
    rule.final_check()
    return rule.rule
