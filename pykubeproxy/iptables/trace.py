"""Trace a new connection through iptables rules, on paper (pure: no kernel, no iptc).

This is a port of the packet tracer in upstream kube-proxy's iptables tests
(pkg/proxy/iptables/proxier_test.go: `iptablesTracer`, `tracePacket`), made
general enough to explain the rules of a live node:

- The text is parsed the way iptables-restore reads it (tables, ``:CHAIN``
  declarations with policies, ``-A``/``-I``/``-X``, quoted comments, ``!``).
  Upstream's test parser (pkg/util/iptables/testing/parse.go) keeps only the
  parameters it knows and drops the rest silently; here every match that is not
  understood is kept and reported.
- The packet walks the hooks a real node runs for the first packet of a
  connection: nat then filter OUTPUT for a locally sent packet (then nat
  POSTROUTING and, for a local destination, filter INPUT); nat PREROUTING for a
  received one, then filter INPUT (+ nat INPUT) or filter FORWARD + nat
  POSTROUTING (mangle and raw are not traversed). Upstream's tracer instead runs
  nat PREROUTING and then the KUBE-* filter chains directly; the verdicts agree
  for kube-proxy's rules.
- Packet marks are tracked (``MARK``, ``-m mark``), so masquerading is what
  KUBE-POSTROUTING really does; upstream infers it from any KUBE-MARK-MASQ jump.
- ``-m statistic`` forks the trace: both outcomes are followed, so the result
  is the set of every endpoint a connection may reach, and each path carries
  its probability: the chance of reaching an endpoint through a chain of
  ``--probability`` rules is the product along its path (1/3 each for three).
- ``-m recent --rcheck`` matches only for a client listed in the kernel's
  ``xt_recent`` entries given in `NodeState`; with none given a client is new
  and has no affinity entry, as in upstream's tracer. Conntrack state is NEW,
  plus DNAT once the destination was rewritten.
- What the rules depend on besides the packet comes from `NodeState`, read from
  the kernel by the caller or derived from a rendered state: ipset members
  (``-m set``), ``-m recent`` entries (session affinity), and IPVS virtual
  services. With IPVS services the hooks follow IPVS mode's kernel path: a
  received packet for a virtual service passes filter INPUT, IPVS picks a real
  server at LOCAL_IN and sends it on through filter OUTPUT and nat POSTROUTING;
  a locally sent one meets IPVS between nat OUTPUT and filter OUTPUT (the
  ip_vs hook priorities in net/netfilter/ipvs/ip_vs_core.c).
- A match or target the tracer does not understand (``-i``, ``LOG``, a set it
  was not given …) is never skipped silently: matches fork (both outcomes are
  followed) and every such assumption is listed in the result.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import ip_address, ip_network

from pykubeproxy.model import IPAddress

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
VERDICTS = ("ACCEPT", "DROP", "REJECT")
# Options that take no value; every other option takes one (--match-set takes two).
FLAG_OPTIONS = {"--rcheck", "--set", "--update", "--remove", "--reap", "--rsource", "--rdest",
                "--rttl", "--random-fully", "--random", "--persistent", "--physdev-is-in",
                "--physdev-is-out", "--physdev-is-bridged", "--ipvs"}  # fmt: skip
# Options that only qualify another one of their module (its name, timeout, …).
QUALIFIERS = {"--name", "--seconds", "--reap", "--rsource", "--rdest", "--mask", "--hitcount",
              "--rttl", "--probability", "--every", "--packet"}  # fmt: skip
IP_PROTOCOLS = {"6": "tcp", "17": "udp", "132": "sctp"}
MAX_DEPTH = 64


class TraceError(ValueError):
    """The rules cannot be parsed or traced (bad syntax, a jump loop)."""


@dataclass(frozen=True)
class Match:
    """One match option of a rule: ``[!] OPTION VALUE…`` from module `module` ("" if none)."""

    module: str
    option: str
    values: tuple[str, ...]
    negated: bool = False

    def __str__(self) -> str:
        text = " ".join(shlex.quote(v) for v in (self.option, *self.values))
        text = f"! {text}" if self.negated else text
        return f"-m {self.module} {text}" if self.module else text


@dataclass(frozen=True)
class Rule:
    """A parsed rule; `text` is the line as written, for explanations."""

    text: str
    matches: tuple[Match, ...]
    target: str | None = None
    goto: bool = False
    target_options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str) -> str | None:
        return next((value for key, value in self.target_options if key == name), None)

    def value(self, module: str, option: str) -> str | None:
        """The first value of a match option of `module` (e.g. the ``--name`` of recent)."""
        found = (m for m in self.matches if m.module == module and m.option == option)
        return next((m.values[0] for m in found if m.values), None)


@dataclass
class Chain:
    rules: list[Rule] = field(default_factory=list)
    policy: str | None = None  # built-in chains only


@dataclass
class Ruleset:
    """Tables of chains, as iptables-restore would leave them."""

    tables: dict[str, dict[str, Chain]] = field(default_factory=dict)

    def chain(self, table: str, name: str) -> Chain | None:
        return self.tables.get(table, {}).get(name)

    def rules(self, table: str) -> Iterator[tuple[str, int, Rule]]:
        """(chain, rule number, rule) for every rule of a table."""
        for name, chain in self.tables.get(table, {}).items():
            for number, rule in enumerate(chain.rules, 1):
                yield name, number, rule


def parse(text: str, into: Ruleset | None = None) -> Ruleset:
    """Parse iptables-save / iptables-restore text; later sections add to `into`."""
    ruleset = into if into is not None else Ruleset()
    table: dict[str, Chain] | None = None
    table_name = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table_name = line[1:]
            table = ruleset.tables.setdefault(table_name, {})
            for builtin in BUILTIN_CHAINS.get(table_name, ()):
                table.setdefault(builtin, Chain(policy="ACCEPT"))
        elif table is None:
            raise TraceError(f"line {number}: {line!r} comes before any *table")
        elif line == "COMMIT":
            table = None
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            table[name] = Chain(policy=None if policy == "-" else policy)
        else:
            _apply_command(table, table_name, line, number)
    return ruleset


def _apply_command(table: dict[str, Chain], table_name: str, line: str, number: int) -> None:
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise TraceError(f"line {number}: {err}") from None
    if len(words) < 2:
        raise TraceError(f"line {number}: {line!r} names no chain")
    command, chain_name, args = words[0], words[1], words[2:]
    builtin = chain_name in BUILTIN_CHAINS.get(table_name, ())
    if command == "-X":
        table.pop(chain_name, None)
        return
    if command not in ("-A", "-I") or (chain_name not in table and not builtin):
        raise TraceError(f"line {number}: cannot apply {line!r} in table {table_name}")
    chain = table.setdefault(chain_name, Chain(policy="ACCEPT"))
    position = 0
    if command == "-I" and args and args[0].isdigit():
        position, args = int(args[0]) - 1, args[1:]
    try:
        rule = parse_rule(args, line)
    except IndexError:
        raise TraceError(f"line {number}: {line!r} ends in the middle of an option") from None
    if command == "-A":
        chain.rules.append(rule)
    else:
        chain.rules.insert(position, rule)


def parse_rule(args: list[str], text: str) -> Rule:
    """Split a rule's words into matches and a target with its options."""
    matches: list[Match] = []
    module, negated, i = "", False, 0
    while i < len(args):
        word = args[i]
        if word == "!":
            negated, i = True, i + 1
            continue
        if word == "-m":
            module, i = args[i + 1], i + 2
            continue
        if word in ("-j", "-g"):
            options = args[i + 2 :]
            pairs = [
                (o, "" if o in FLAG_OPTIONS else options[n + 1]) for n, o in _option_starts(options)
            ]
            return Rule(text, tuple(matches), args[i + 1], word == "-g", tuple(pairs))
        count = _value_count(word, args, i)
        owner = module if word.startswith("--") else ""  # -s, -d, -p, -i, -o are built in
        matches.append(Match(owner, word, tuple(args[i + 1 : i + 1 + count]), negated))
        negated, i = False, i + 1 + count
    return Rule(text, tuple(matches))


def _option_starts(words: list[str]) -> Iterator[tuple[int, str]]:
    for n, word in enumerate(words):
        if word.startswith("--"):
            yield n, word


def _value_count(option: str, args: list[str], at: int) -> int:
    """How many of the words after `option` are its values."""
    if option in FLAG_OPTIONS:
        return 0
    if option == "--match-set":
        return 2
    if option == "--comment":  # iptables-save quotes it; tolerate unquoted words too
        rest = args[at + 1 :]
        return next((n for n, w in enumerate(rest) if w.startswith("-") or w == "!"), len(rest))
    return 1


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection.

    `bridged` says whether it entered the node through a bridge port (a pod behind
    the node's bridge): what ``-m physdev`` tests. None when unknown.
    """

    source: IPAddress
    destination: IPAddress
    port: int
    protocol: str = "tcp"
    bridged: bool | None = None


@dataclass(frozen=True)
class IpSet:
    """An ipset as ``ipset list`` shows it: its type and its members' text."""

    type: str
    members: frozenset[str]

    def contains(self, values: tuple[IPAddress | int, ...], protocol: str) -> bool:
        """Whether the tuple the match dimensions picked (address or port each) is a member."""
        return any(_member_holds(self.type, m, values, protocol) for m in self.members)


def _member_holds(
    set_type: str, member: str, values: tuple[IPAddress | int, ...], protocol: str
) -> bool:
    """One member against the packet's values, dimension by dimension of the set type."""
    parts = member.split(",")
    kinds = set_type.partition(":")[2].split(",")
    if len(parts) != len(kinds) or len(values) < len(kinds):
        return False
    return all(
        _part_holds(kind, part, value, protocol, any_protocol=set_type == "bitmap:port")
        for kind, part, value in zip(kinds, parts, values, strict=False)
    )


def _part_holds(
    kind: str, part: str, value: IPAddress | int, protocol: str, *, any_protocol: bool
) -> bool:
    """``ip`` equal, ``net`` containing, ``port`` equal (``proto:port``, tcp when bare;
    a bitmap:port set holds ports of every protocol)."""
    if kind == "port":
        proto, _, number = part.rpartition(":")
        return number == str(value) and (any_protocol or (proto or "tcp") == protocol)
    if isinstance(value, int):
        return False
    if kind == "ip":
        return ip_address(part) == value
    return kind == "net" and _in(value, part)


@dataclass(frozen=True)
class RealServer:
    """One real server of an IPVS virtual service: ``ip:port`` and its weight."""

    address: str
    weight: int = 1


@dataclass(frozen=True)
class VirtualService:
    """An IPVS virtual service: how it schedules and where it sends new connections."""

    scheduler: str
    real_servers: tuple[RealServer, ...]
    persistent_seconds: int | None = None


VirtualKey = tuple[IPAddress, int, str]  # address, port, protocol ("tcp")


@dataclass(frozen=True)
class NodeState:
    """What the node holds besides its rules that decides where a packet goes.

    `ipsets`: sets by name (a set not listed is unknown: its matches fork).
    `recent`: xt_recent list name → the addresses in it (a list not listed is empty).
    `virtual_services`: IPVS services; None when the node runs no IPVS (then IPVS
    does not take part and ``-m ipvs`` is not understood).
    """

    ipsets: Mapping[str, IpSet] = field(default_factory=dict)
    recent: Mapping[str, frozenset[IPAddress]] = field(default_factory=dict)
    virtual_services: Mapping[VirtualKey, VirtualService] | None = None


@dataclass(frozen=True)
class Step:
    """One rule the packet matched: where it is and what it says.

    IPVS's choice of a real server is a step too, in table "ipvs", chain the
    virtual service, number the real server's position.
    """

    table: str
    chain: str
    number: int
    rule: str


@dataclass(frozen=True)
class Path:
    """One way the connection can go (statistic and unknown matches fork the trace)."""

    steps: tuple[Step, ...]
    verdict: str
    destination: str | None = None  # the DNAT target, as written in the rule
    masquerade: bool = False
    accepted_by_rule: bool = False
    assumptions: tuple[str, ...] = ()
    # The chance of this path among those with the same assumptions.
    probability: float = 1.0
    virtual_service: str | None = None  # the IPVS service that picked the destination

    @property
    def output(self) -> str:
        """Upstream's per-path outcome: DROP/REJECT, the endpoint, ACCEPT by a rule, or ""."""
        if self.verdict != "ACCEPT":
            return self.verdict
        return self.destination or ("ACCEPT" if self.accepted_by_rule else "")


@dataclass(frozen=True)
class TraceResult:
    paths: tuple[Path, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Distinct outcomes: endpoints in address order, then verdicts."""
        return tuple(sorted({p.output for p in self.paths if p.output}, key=output_order))

    @property
    def output(self) -> str:
        """Upstream's form: ``"10.180.0.1:80, 10.180.0.2:80"``, ``"DROP"``, or ``""``."""
        return ", ".join(self.outputs)

    @property
    def masquerade(self) -> bool:
        return any(p.masquerade for p in self.paths)

    @property
    def matches(self) -> tuple[Step, ...]:
        """Every rule matched on any path, in the order first met."""
        return tuple(dict.fromkeys(step for p in self.paths for step in p.steps))

    @property
    def assumptions(self) -> tuple[str, ...]:
        """What the tracer did not understand and assumed; empty when the result is exact."""
        return tuple(dict.fromkeys(a for p in self.paths for a in p.assumptions))


def output_order(output: str) -> tuple[int, int, int, str]:
    """Endpoints by IP version, address and port; then the verdict words (as "version 7")."""
    endpoint = split_destination(output)
    if endpoint is None:
        return (7, 0, 0, output)
    ip, port = endpoint
    return (ip.version, int(ip), port or 0, output)


def split_destination(text: str) -> tuple[IPAddress, int | None] | None:
    """``ip``, ``ip:port`` or ``[ipv6]:port`` as (address, port); None if it is not one."""
    host, _, port = text.rpartition(":") if text.count(":") == 1 or "]" in text else (text, "", "")
    try:
        return ip_address(host.strip("[]")), int(port) if port else None
    except ValueError:
        return None


class _Match(Enum):
    YES = "yes"
    NO = "no"
    EITHER = "either"  # understood, but may go both ways (statistic)
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class _Verdict:
    """Whether a rule matches: no, or yes once its unknown matches hold and its dice say so."""

    no: bool = False
    unknown: tuple[str, ...] = ()
    chance: float | None = None  # a statistic match's probability of matching


@dataclass(frozen=True)
class _State:
    """A packet on one path: what rules may have rewritten, and what happened to it."""

    destination: IPAddress
    port: int
    mark: int = 0
    ctstate: frozenset[str] = frozenset({"NEW"})
    dnat: str | None = None
    masquerade: bool = False
    accepted_by_rule: bool = False
    steps: tuple[Step, ...] = ()
    assumptions: tuple[str, ...] = ()
    probability: float = 1.0
    virtual_service: VirtualKey | None = None

    def assume(self, text: str) -> _State:
        return dataclasses.replace(self, assumptions=(*self.assumptions, text))

    def scaled(self, factor: float) -> _State:
        return dataclasses.replace(self, probability=self.probability * factor)


LocalAddresses = Callable[[IPAddress], bool] | Collection[str | IPAddress]


def trace(
    ruleset: Ruleset, packet: Packet, local: LocalAddresses, node: NodeState | None = None
) -> TraceResult:
    """Every way `packet` can go through `ruleset` on a node whose own addresses are `local`
    and whose sets, affinity entries and IPVS services are `node`."""
    return _Tracer(ruleset, packet, _local_predicate(local), node or NodeState()).run()


def _local_predicate(local: LocalAddresses) -> Callable[[IPAddress], bool]:
    if callable(local):
        return local
    addresses = {ip_address(a) for a in local}
    return addresses.__contains__


def virtual_service_name(key: VirtualKey) -> str:
    """``10.96.0.10:80/TCP``, as kube-proxy names an IPVS service."""
    ip, port, protocol = key
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{port}/{protocol.upper()}"


Then = Callable[[_State], Iterator[Path]]


@dataclass
class _Tracer:
    ruleset: Ruleset
    packet: Packet
    is_local: Callable[[IPAddress], bool]
    node: NodeState

    def run(self) -> TraceResult:
        start = _State(self.packet.destination, self.packet.port)
        if self.is_local(self.packet.source):
            return TraceResult(tuple(self._hooks(start, (("nat", "OUTPUT"),), self._local_out)))
        return TraceResult(tuple(self._hooks(start, (("nat", "PREROUTING"),), self._route)))

    def _local_out(self, state: _State) -> Iterator[Path]:
        """A locally sent packet meets IPVS (if its destination is a virtual service), then
        filter OUTPUT and nat POSTROUTING."""
        sent = (("filter", "OUTPUT"), ("nat", "POSTROUTING"))
        return self._via_ipvs(state, lambda s: self._hooks(s, sent, self._after_output))

    def _route(self, state: _State) -> Iterator[Path]:
        """A received packet is delivered here or forwarded, by its (rewritten) destination;
        one for an IPVS virtual service is handed to IPVS after filter INPUT."""
        if self.is_local(state.destination):
            if self._virtual(state) is not None:
                return self._hooks(state, (("filter", "INPUT"),), self._ipvs_forward)
            return self._hooks(state, (("filter", "INPUT"), ("nat", "INPUT")), self._delivered)
        return self._hooks(state, (("filter", "FORWARD"), ("nat", "POSTROUTING")), self._delivered)

    def _ipvs_forward(self, state: _State) -> Iterator[Path]:
        """IPVS sends the packet it scheduled out through the LOCAL_OUT hooks again."""
        out = (("filter", "OUTPUT"), ("nat", "POSTROUTING"))
        return self._via_ipvs(state, lambda s: self._hooks(s, out, self._delivered))

    def _after_output(self, state: _State) -> Iterator[Path]:
        """A locally sent packet for a local address comes back in over loopback."""
        if self.is_local(state.destination):
            return self._hooks(state, (("filter", "INPUT"),), self._delivered)
        return self._delivered(state)

    def _delivered(self, state: _State) -> Iterator[Path]:
        yield self._path(state, "ACCEPT")

    def _virtual(self, state: _State) -> VirtualService | None:
        services = self.node.virtual_services
        if services is None:
            return None
        return services.get((state.destination, state.port, self.packet.protocol))

    def _via_ipvs(self, state: _State, then: Then) -> Iterator[Path]:
        """IPVS's part: a virtual service picks one of its real servers (weighted; weight 0
        takes no new connection), or answers port unreachable when it has none."""
        service = self._virtual(state)
        if service is None:
            yield from then(state)
            return
        key = (state.destination, state.port, self.packet.protocol)
        name = virtual_service_name(key)
        servers = [rs for rs in service.real_servers if rs.weight > 0]
        total = sum(rs.weight for rs in servers)
        if not servers:
            step = Step("ipvs", name, 0, "no real server: ICMP port unreachable")
            yield self._path(dataclasses.replace(state, steps=(*state.steps, step)), "REJECT")
            return
        sticky = f", persistent {service.persistent_seconds}s" if service.persistent_seconds else ""
        for number, rs in enumerate(service.real_servers, 1):
            if rs.weight <= 0:
                continue
            target = split_destination(rs.address)
            if target is None or target[1] is None:
                raise TraceError(f"cannot read the IPVS real server {rs.address!r}")
            text = f"-> {rs.address} ({service.scheduler}, weight {rs.weight}{sticky})"
            chosen = dataclasses.replace(
                state.scaled(rs.weight / total),
                destination=target[0], port=target[1], dnat=rs.address, virtual_service=key,
                steps=(*state.steps, Step("ipvs", name, number, text)),
            )  # fmt: skip
            yield from then(chosen)

    def _hooks(
        self, state: _State, hooks: tuple[tuple[str, str], ...], then: Then
    ) -> Iterator[Path]:
        """Run `hooks` in order on every path, then `then` on the paths still accepted."""
        if not hooks:
            yield from then(state)
            return
        (table, chain), rest = hooks[0], hooks[1:]
        for after, verdict in self._hook(table, chain, state):
            if verdict == "ACCEPT":
                yield from self._hooks(after, rest, then)
            else:
                yield self._path(after, verdict)

    def _path(self, state: _State, verdict: str) -> Path:
        vs = state.virtual_service
        return Path(state.steps, verdict, state.dnat, state.masquerade, state.accepted_by_rule,
                    state.assumptions, state.probability,
                    virtual_service_name(vs) if vs else None)  # fmt: skip

    def _hook(self, table: str, name: str, state: _State) -> Iterator[tuple[_State, str]]:
        chain = self.ruleset.chain(table, name)
        if chain is None:
            yield state, "ACCEPT"
            return
        for after, verdict in self._chain(table, name, state, 0):
            yield after, verdict or chain.policy or "ACCEPT"

    def _chain(
        self, table: str, name: str, state: _State, depth: int
    ) -> Iterator[tuple[_State, str | None]]:
        """Run a chain; yield (state, verdict) per path, verdict None when it returned."""
        if depth > MAX_DEPTH:
            raise TraceError(f"jumps nest deeper than {MAX_DEPTH} at {table}/{name}")
        chain = self.ruleset.chain(table, name)
        assert chain is not None
        pending = [(state, 0)]
        while pending:
            current, start = pending.pop()
            for index in range(start, len(chain.rules)):
                rule = chain.rules[index]
                verdict = self._matches(rule, current)
                if verdict.no:
                    continue
                if verdict.unknown:
                    skipped = current
                    for text in verdict.unknown:
                        skipped = skipped.assume(f"{text} (assumed not to match)")
                    pending.append((skipped, index + 1))
                    for text in verdict.unknown:
                        current = current.assume(f"{text} (assumed to match)")
                if verdict.chance is not None:
                    pending.append((current.scaled(1 - verdict.chance), index + 1))
                    current = current.scaled(verdict.chance)
                step = Step(table, name, index + 1, rule.text)
                current = dataclasses.replace(current, steps=(*current.steps, step))
                outcome = self._target(table, rule, current, depth)
                if isinstance(outcome, _State):
                    current = outcome
                    continue
                for after, result in outcome:
                    if result == "continue":
                        pending.append((after, index + 1))
                    else:
                        yield after, None if result == "return" else result
                break
            else:
                yield current, None

    def _target(
        self, table: str, rule: Rule, state: _State, depth: int
    ) -> _State | list[tuple[_State, str]]:
        """Apply the rule's target: a new state to go on with, or how the chain ends."""
        target = rule.target
        if target is None:
            return state
        if target in VERDICTS:
            accepted = state.accepted_by_rule or (table == "filter" and target == "ACCEPT")
            return [(dataclasses.replace(state, accepted_by_rule=accepted), target)]
        if target == "RETURN":
            return [(state, "return")]
        if target == "MARK":
            return dataclasses.replace(state, mark=_new_mark(rule, state.mark))
        if target == "DNAT":
            return [(self._dnat(rule, state), "ACCEPT")]
        if target == "MASQUERADE":
            return [(dataclasses.replace(state, masquerade=True), "ACCEPT")]
        if self.ruleset.chain(table, target) is None:
            return state.assume(f"target {target} of {rule.text!r} not understood: went on")
        after_goto = "return" if rule.goto else "continue"
        return [
            (after, verdict or after_goto)
            for after, verdict in self._chain(table, target, state, depth + 1)
        ]

    def _dnat(self, rule: Rule, state: _State) -> _State:
        to = rule.option("--to-destination") or ""
        parsed = split_destination(to)
        if parsed is None:
            raise TraceError(f"cannot read the DNAT destination of {rule.text!r}")
        ip, port = parsed
        return dataclasses.replace(
            state, destination=ip, port=port or state.port, dnat=to,
            ctstate=state.ctstate | {"DNAT"},
        )  # fmt: skip

    def _matches(self, rule: Rule, state: _State) -> _Verdict:
        """Whether all of the rule's matches hold, the ones taken on trust, and the chance
        that its statistic match picks this packet."""
        results = [(m, self._match(m, rule, state)) for m in rule.matches]
        if any(r is _Match.NO for _, r in results):
            return _Verdict(no=True)
        unknown = tuple(f"{m} in {rule.text!r}" for m, r in results if r is _Match.UNKNOWN)
        either = [m for m, r in results if r is _Match.EITHER]
        chance = _chance(rule, either[0]) if either else None
        return _Verdict(unknown=unknown, chance=chance)

    def _match(self, match: Match, rule: Rule, state: _State) -> _Match:
        """One match, negated when written with ``!`` (a qualifier's ``!``, as in
        ``! --probability``, belongs to its module's match and is applied there)."""
        try:
            result = self._evaluate(match, rule, state)
        except ValueError as err:
            raise TraceError(f"cannot evaluate {match}: {err}") from None
        if match.negated and result in (_Match.YES, _Match.NO) and match.option not in QUALIFIERS:
            return _Match.NO if result is _Match.YES else _Match.YES
        return result

    def _evaluate(self, match: Match, rule: Rule, state: _State) -> _Match:
        option, values, packet, module = match.option, match.values, self.packet, match.module
        if option in ("-s", "--source", "-d", "--destination"):
            address = packet.source if option in ("-s", "--source") else state.destination
            return _yes(any(_in(address, cidr) for cidr in values[0].split(",")))
        if option in ("-p", "--protocol"):
            return _yes(values[0].lower() in (packet.protocol, "all"))
        if option in ("--dport", "--destination-port", "--dports"):
            return _yes(any(_in_range(state.port, r) for r in values[0].split(",")))
        if option in ("--src-type", "--dst-type") and values[0] == "LOCAL":
            address = packet.source if option == "--src-type" else state.destination
            return _yes(self.is_local(address))
        if option == "--mark":
            value, _, mask = values[0].partition("/")
            return _yes(state.mark & int(mask or "0xffffffff", 0) == int(value, 0))
        if option in ("--ctstate", "--state"):
            return _yes(bool(state.ctstate & set(values[0].split(","))))
        if module == "recent" and option not in QUALIFIERS:
            return self._recent(option, rule, state)
        if module == "statistic" and option == "--mode":
            return _Match.EITHER if values[0] in ("random", "nth") else _Match.UNKNOWN
        if module == "set" and option == "--match-set":
            return self._set(values[0], values[1], state)
        if module == "physdev" and option in ("--physdev-is-in", "--physdev-is-bridged"):
            return self._bridged()
        if module == "ipvs" and self.node.virtual_services is not None:
            return self._ipvs_match(option, values, state)
        if option in ("--comment", "--nfacct-name") or option in QUALIFIERS:
            return _Match.YES
        return _Match.UNKNOWN

    def _recent(self, option: str, rule: Rule, state: _State) -> _Match:
        """``--set`` always matches; a check matches when the client is in the list."""
        if option == "--set":
            return _Match.YES
        if option not in ("--rcheck", "--update", "--remove"):
            return _Match.UNKNOWN
        listed = self.node.recent.get(rule.value("recent", "--name") or "DEFAULT", frozenset())
        by_destination = any(m.option == "--rdest" for m in rule.matches)
        return _yes((state.destination if by_destination else self.packet.source) in listed)

    def _set(self, name: str, dimensions: str, state: _State) -> _Match:
        found = self.node.ipsets.get(name)
        if found is None:
            return _Match.UNKNOWN
        picked: list[IPAddress | int] = []
        for index, side in enumerate(dimensions.split(",")):
            is_port = found.type.partition(":")[2].split(",")[index : index + 1] == ["port"]
            if side == "src":
                if is_port:
                    return _Match.UNKNOWN  # the tracer's packets have no source port
                picked.append(self.packet.source)
            else:
                picked.append(state.port if is_port else state.destination)
        return _yes(found.contains(tuple(picked), self.packet.protocol))

    def _bridged(self) -> _Match:
        if self.is_local(self.packet.source):
            return _Match.NO  # a locally sent packet has no input device at all
        return _Match.UNKNOWN if self.packet.bridged is None else _yes(self.packet.bridged)

    def _ipvs_match(self, option: str, values: tuple[str, ...], state: _State) -> _Match:
        """``-m ipvs``: the packet belongs to an IPVS connection (to this virtual service)."""
        vs = state.virtual_service
        if option == "--ipvs":
            return _yes(vs is not None)
        if vs is None:
            return _Match.NO
        if option == "--vaddr":
            return _yes(_in(vs[0], values[0]))
        if option == "--vport":
            return _yes(vs[1] == int(values[0]))
        if option == "--vproto":
            return _yes(IP_PROTOCOLS.get(values[0], values[0].lower()) == vs[2])
        return _Match.UNKNOWN


def _chance(rule: Rule, mode: Match) -> float:
    """The probability that a statistic match picks a new connection: ``--probability``
    (its complement when negated), or 1/N for ``--mode nth --every N``."""
    if mode.values[0] == "nth":
        return 1 / int(rule.value("statistic", "--every") or "1")
    found = next(m for m in rule.matches if m.option == "--probability")
    chance = float(found.values[0])
    return 1 - chance if found.negated else chance


def _yes(condition: bool) -> _Match:
    return _Match.YES if condition else _Match.NO


def _in(address: IPAddress, cidr: str) -> bool:
    network = ip_network(cidr, strict=False)
    return network.version == address.version and address in network


def _in_range(port: int, spec: str) -> bool:
    low, _, high = spec.partition(":")
    return int(low or 0) <= port <= int(high or low or 65535)


def _new_mark(rule: Rule, mark: int) -> int:
    for option, value in rule.target_options:
        number, _, mask = value.partition("/")
        bits = int(number, 0) if number else 0
        if option == "--or-mark":
            mark |= bits
        elif option == "--xor-mark":
            mark ^= bits
        elif option == "--and-mark":
            mark &= bits
        elif option in ("--set-mark", "--set-xmark"):
            keep = ~int(mask, 0) if mask else 0
            mark = (mark & keep) ^ bits if option == "--set-xmark" else (mark & keep) | bits
    return mark & 0xFFFFFFFF
