"""Make the kernel's legacy xtables match a rendered `TableState` (python-iptables).

One transaction per table: the table is read once (libiptc's iptc_init), the
agent's chains are rewritten whole in memory, stale chains of the agent are
deleted, missing jump rules are inserted, and everything lands in one atomic
commit. Chains and rules the agent does not own are never touched: libiptc
writes them back exactly as it read them.

Between full syncs the applier remembers what its last commit wrote and the
kernel's size of the table right after it (entries, bytes, hook offsets: one
getsockopt, no table read). While the table still has that size, nobody has
changed it, so a partial sync rewrites only the chains whose rules differ from
what it wrote, and a sync with nothing to change does not touch the kernel.
Any other writer (kubelet, a CNI plugin, an operator) changes the size, and the
next sync checks and rewrites everything it was asked to, as before.

Building a rule through python-iptables costs hundreds of microseconds, so the
binary entry of each distinct rule is built once and cached: a re-sync that
rewrites unchanged rules only copies cached bytes into libiptc.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pykubeproxy.backend import KeptChainMissing
from pykubeproxy.iptables.encoder import EntryEncoder
from pykubeproxy.iptables.iptc_rules import built_entry, iptc
from pykubeproxy.iptables.ruleset import CANARY, Argv, Jump, TableState, rule_identity
from pykubeproxy.ownership import is_owned

log = logging.getLogger(__name__)

XTABLES_LOCK = "/run/xtables.lock"
IPT_ENTRY_SIZE = ctypes.sizeof(iptc.ip4tc.ipt_entry)
MATCH_NAME_OFFSET = 2  # struct xt_entry_match: u16 match_size, char name[29], u8 revision
MATCH_HEADER_SIZE = 32
COMMENT_SIZE = 256
SLOW_CACHE_LIMIT = 10_000
# Rules one commit must write before learning the encoder pays off (python-iptables builds
# a rule in ~0.2 ms; learning and checking every shape takes ~0.9 s).
LEARN_AFTER = 3_000


class ApplyError(RuntimeError):
    """The kernel refused a transaction; nothing of it was applied."""


IPT_SO_GET_INFO = 64  # linux/netfilter_ipv4/ip_tables.h: IPT_BASE_CTL
TableInfo = tuple[int, ...]


class _IptGetInfo(ctypes.Structure):
    """struct ipt_getinfo: a table's size and hook offsets, without its entries."""

    _fields_ = [
        ("name", ctypes.c_char * 32),
        ("valid_hooks", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * 5),
        ("underflow", ctypes.c_uint * 5),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def table_info(name: str) -> TableInfo | None:
    """The table's entry count, byte size and hook offsets; None if it cannot be read."""
    info = _IptGetInfo(name=name.encode())
    length = ctypes.c_uint(ctypes.sizeof(info))
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        status = _libc.getsockopt(
            sock.fileno(),
            socket.IPPROTO_IP,
            IPT_SO_GET_INFO,
            ctypes.byref(info),
            ctypes.byref(length),
        )
    if status != 0:
        return None
    return (info.num_entries, info.size, *info.hook_entry, *info.underflow)


@dataclass
class Written:
    """What the applier's last commit left in one table.

    `chains` maps every owned chain there to the rules written in it, or to None
    when the chain was kept and its rules are not known here.
    """

    info: TableInfo
    chains: dict[str, list[Argv] | None]
    jumps: list[Jump]
    ensured: dict[str, list[Argv]]


def _jump_identity(entry: Any, table: Any) -> tuple[str, str] | None:
    """(target, comment) of a kernel rule, read from its raw bytes.

    Walking the entry's match headers needs no extension parsing, so foreign
    rules with matches python-iptables cannot parse are still read safely.
    """
    raw = ctypes.string_at(ctypes.addressof(entry), entry.next_offset)
    target = table.get_target(entry)
    if not target:
        return None
    comment = ""
    offset = IPT_ENTRY_SIZE
    while offset < entry.target_offset:
        size = int.from_bytes(raw[offset : offset + 2], "little")
        name = raw[offset + MATCH_NAME_OFFSET : offset + MATCH_NAME_OFFSET + 29].split(b"\0")[0]
        if name == b"comment":
            data = raw[offset + MATCH_HEADER_SIZE : offset + MATCH_HEADER_SIZE + COMMENT_SIZE]
            comment = data.split(b"\0")[0].decode(errors="replace")
        if size <= 0:
            break
        offset += size
    return target.decode() if isinstance(target, bytes) else str(target), comment


@contextmanager
def xtables_lock(path: str = XTABLES_LOCK) -> Iterator[None]:
    """Hold the lock iptables -w uses, so other tools never interleave with a commit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as err:
        log.warning("cannot open %s (%s); applying without the xtables lock", path, err)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class IptcApplier:
    """Applies rendered tables with python-iptables, one commit per table."""

    def __init__(
        self,
        lock_path: str = XTABLES_LOCK,
        *,
        samples: Callable[[], Iterable[Argv]] | None = None,
        learn_after: int = 0,
        shapes: str | None = None,
    ) -> None:
        self.lock_path = lock_path
        # Entries only python-iptables can build, kept because each costs ~300 µs.
        self._slow_entries: dict[Argv, Any] = {}
        # Learned from `samples` the first time one commit writes more than `learn_after`
        # rules: learning costs as much as a few thousand python-iptables builds, so a
        # small cluster's syncs never wait for it. With saved `shapes` it starts at once,
        # checking each shape on its first rule (one build per shape).
        self.encoder = EntryEncoder.from_file(shapes) if shapes is not None else None
        self._samples = samples
        self.learn_after = learn_after
        self._staged = 0
        self._written: dict[str, Written] = {}

    def _entry(self, argv: Argv) -> Any:
        """The rule's binary entry: from the fast encoder, else python-iptables (cached).

        Rules matching an ipset are always built afresh: their bytes hold the
        kernel's index of the set, which the kernel alone knows.
        """
        if "set" in argv and argv[argv.index("set") - 1] == "-m":
            return built_entry(argv)
        if self._samples is not None and self.encoder is None and self._staged >= self.learn_after:
            self.encoder = EntryEncoder(self._samples())
        entry = self.encoder.encode(argv) if self.encoder is not None else None
        if entry is None:
            entry = self._slow_entries.get(argv)
        if entry is None:
            if len(self._slow_entries) >= SLOW_CACHE_LIMIT:
                self._slow_entries.clear()
            entry = self._slow_entries[argv] = built_entry(argv)
        return entry

    def apply(self, tables: list[TableState]) -> None:
        with xtables_lock(self.lock_path):
            for state in tables:
                self._apply_table(state)
        # libiptc's copy of a large table is freed by now, but malloc keeps the pages;
        # hand them back so the agent's resident memory between syncs is what it holds.
        _libc.malloc_trim(0)

    def _apply_table(self, state: TableState) -> None:
        last = self._written.pop(state.name, None)
        trusted = last if state.partial and last is not None else None
        if trusted is not None and table_info(state.name) != trusted.info:
            log.debug("%s changed since the last commit: rewriting all it asks for", state.name)
            trusted = None
        if trusted is not None and _nothing_to_do(state, trusted):
            self._written[state.name] = trusted
            return
        table = iptc.Table(state.name, autocommit=False)
        table.refresh()
        try:
            rewrite, stale = self._stage(table, state, trusted)
            table.commit()
        except iptc.IPTCError as err:
            raise ApplyError(f"{state.name}: {err}") from err
        finally:
            table.close()  # frees libiptc's copy of the table until the next sync
        info = table_info(state.name)
        if info is None:
            return
        if trusted is None:
            chains: dict[str, list[Argv] | None] = dict.fromkeys(state.kept)
        else:
            chains = trusted.chains
            for chain in stale:
                del chains[chain]
            chains.update(dict.fromkeys(state.kept - chains.keys()))
        chains.update(rewrite)
        self._written[state.name] = Written(info, chains, state.jumps, state.ensured)

    def _stage(
        self, table: Any, state: TableState, trusted: Written | None
    ) -> tuple[dict[str, list[Argv]], list[str]]:
        """Stage the table's changes in libiptc; returns the chains (re)written and deleted.

        With `trusted` (the kernel's table is as the last commit left it), chains
        whose rules are unchanged are left alone and nothing is checked.
        """
        existing: Collection[str]
        owned: Collection[str]
        if trusted is None:
            existing = set(chain_names(table))
            if state.kept and CANARY not in existing:
                raise KeptChainMissing(f"{state.name}: {CANARY} is gone")
            for chain in state.kept:
                if chain not in existing or not table.first_rule(chain):
                    raise KeptChainMissing(f"{state.name}: {chain} is gone or empty")
            rewrite = state.chains
            owned = [chain for chain in existing if is_owned(chain)]
        else:
            existing = owned = trusted.chains.keys()
            rewrite = {c: r for c, r in state.chains.items() if trusted.chains.get(c) != r}
        self._staged = sum(len(rules) for rules in rewrite.values())
        lib = table._iptc  # python-iptables' libiptc calls, without a wrapper per rule
        # libiptc keeps user chains sorted and finds a new chain's place by walking from its
        # index: created in order, 63,000 chains took 0.2 s instead of 0.5-0.7 s.
        names = {chain: chain.encode() for chain in sorted(rewrite)}
        for chain, name in names.items():
            fill = lib.iptc_flush_entries if chain in existing else lib.iptc_create_chain
            _checked(table, fill(name, table._handle), chain)
        for chain, name in names.items():
            for argv in rewrite[chain]:
                entry = self._entry(argv)
                pointer = entry if type(entry) is bytes else ctypes.cast(entry, ctypes.c_void_p)
                _checked(table, lib.iptc_append_entry(name, pointer, table._handle), chain)
        if trusted is None or state.ensured != trusted.ensured:
            self._ensure_shared(table, state)
        if trusted is None or state.jumps != trusted.jumps:
            self._reconcile_jumps(table, state)
        wanted = state.chains.keys() | state.kept
        stale = [chain for chain in owned if chain not in wanted]
        for chain in stale:
            table.flush_entries(chain)
        for chain in stale:
            table.delete_chain(chain)
        return rewrite, stale

    def _ensure_shared(self, table: Any, state: TableState) -> None:
        """Create kubelet-shared chains when missing and append the rules they lack.

        A rule is there when one with its target and comment is: kubelet writes the
        localnet guard with the same comment, and its copy counts as ours.
        """
        for chain, rules in state.ensured.items():
            if not table.is_chain(chain):
                table.create_chain(chain)
            present = {_jump_identity(entry, table) for entry in iter_entries(table, chain)}
            for argv in rules:
                if rule_identity(argv) not in present:
                    table.append_entry(chain, self._entry(argv))

    def _reconcile_jumps(self, table: Any, state: TableState) -> None:
        """Make the rules that jump from built-in chains into ours exactly `state.jumps`.

        Jumps into our chains that are not wanted (another mode's, an old
        comment's) are deleted first, so the chains they lead to can go.
        """
        wanted: dict[str, set[tuple[str, str]]] = {}
        for jump in state.jumps:
            wanted.setdefault(jump.chain, set()).add(jump.identity)
        for chain in chain_names(table):
            if not table.builtin_chain(chain):
                continue
            keep = wanted.get(chain, set())
            doomed = [
                position
                for position, entry in enumerate(iter_entries(table, chain))
                if (identity := _jump_identity(entry, table)) is not None
                and is_owned(identity[0])
                and identity not in keep
            ]
            for index in reversed(doomed):
                table._iptc.iptc_delete_num_entry(chain.encode(), index, table._handle)
        # Each missing jump is prepended in turn, as upstream's EnsureRule(Prepend) does, so
        # a built-in chain ends up with them in the reverse of `state.jumps`' order.
        for jump in state.jumps:
            present = {_jump_identity(entry, table) for entry in iter_entries(table, jump.chain)}
            if jump.identity not in present:
                table.insert_entry(jump.chain, self._entry(jump.argv), 0)

    def cleanup(self, table_names: tuple[str, ...] = ("nat", "filter", "mangle")) -> None:
        """Remove every chain and jump rule the agent owns (``--cleanup``): apply nothing."""
        self.apply([TableState(name) for name in table_names])


def _checked(table: Any, status: int, chain: str) -> None:
    """Raise libiptc's error when one of its calls on `chain` failed."""
    if status != 1:
        raise iptc.IPTCError(f"{chain}: {table.strerror()}")


def _nothing_to_do(state: TableState, written: Written) -> bool:
    """Whether the kernel, unchanged since `written`, already holds `state`."""
    return (
        written.chains.keys() == state.chains.keys() | state.kept
        and all(written.chains[chain] == rules for chain, rules in state.chains.items())
        and state.jumps == written.jumps
        and state.ensured == written.ensured
    )


def backend_report() -> list[str]:
    """Warnings about the node's iptables backends, one line each, for the start-up log."""
    try:
        table = iptc.Table("nat", autocommit=False)
        table.refresh()
    except iptc.IPTCError as err:
        return [
            f"legacy xtables (ip_tables) is not usable in this kernel: {err}; "
            "pykubeproxy's iptables mode needs it"
        ]
    foreign_rules = sum(
        1
        for chain in chain_names(table)
        if not is_owned(chain)
        for entry in iter_entries(table, chain)
        if not is_owned((_jump_identity(entry, table) or ("", ""))[0])
    )
    table.close()
    try:
        nft = subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split("\n")
    except OSError:
        return []
    nft_tables = [line.removeprefix("table ").strip() for line in nft if line.startswith("table")]
    if nft_tables and foreign_rules == 0:
        return [
            f"this node's rules live in nf_tables ({', '.join(nft_tables)}), "
            "e.g. iptables-nft; pykubeproxy writes legacy xtables, which the kernel "
            "evaluates too: list them with iptables-legacy-save, not iptables-nft"
        ]
    return []


def iter_entries(table: Any, chain: str) -> Iterator[Any]:
    """The kernel entries of one chain, as libiptc holds them."""
    entry = table.first_rule(chain)
    while entry:
        yield entry
        entry = table.next_rule(entry)


def chain_names(table: Any) -> list[str]:
    """The table's chain names, straight from libiptc (no python-iptables Chain objects)."""
    names = []
    name = table._iptc.iptc_first_chain(table._handle)
    while name:
        names.append(name.decode())
        name = table._iptc.iptc_next_chain(table._handle)
    return names
