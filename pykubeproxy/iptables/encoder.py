"""Encode rendered rules into libiptc entries without python-iptables' parser.

Why: python-iptables turns a rule into the ``struct ipt_entry`` buffer libiptc
takes in about 250 µs (pure-Python option handling, and ``final_check()``
prints every option back through the extension and re-parses it with shlex).
A 10,000-Service cluster has ~200,000 distinct rules, so a first sync would
spend a minute in that parser alone.

How: the renderer's rules come in a few dozen *shapes*: one argument vector
with different IPs, ports, comments, chain names, probabilities and DNAT
destinations. Per shape, python-iptables builds one template entry; the
encoder then builds variants that change one variable at a time and diffs
them, which tells where that variable's bytes live. The only layout knowledge
written down here is how a value is *spelled* (an IPv4 address is 4 bytes in
network order, a tcp port 2 bytes in host order, a comment NUL-padded text),
never at which offset a struct keeps it. Encoding a rule is then a dictionary
lookup and a few slice assignments into a copy of the template (~5 µs).

Trust: nothing is assumed. A learned shape is used only after entries it
produces for random values (and for the real rules it was learned from) are
byte-identical to python-iptables' own. A shape that fails is logged once and
left to python-iptables, and so is every value a codec does not accept in its
canonical spelling (e.g. port ``080``, which xtables reads as octal), so the
kernel sees exactly what the slow path would have written.

Saved shapes: learning every shape takes about a second, so learned shapes can
be saved to a JSON file and a later process created from it. Such a shape is
not trusted either: python-iptables picks the extension revisions the running
kernel supports, so a file made on another machine (or tampered with) may not
match. On the first rule of a loaded shape, python-iptables builds that rule
and the two entries are compared; a shape that differs is dropped and learned
afresh. So a start with a file costs one python-iptables build per shape used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import socket
import string
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pykubeproxy.iptables.iptc_rules import build_rule, resolving_chains
from pykubeproxy.iptables.ruleset import Argv

log = logging.getLogger(__name__)

HOST = sys.byteorder  # xt_tcp ports, statistic's probability, recent's seconds

Pieces = tuple[bytes, ...]
Builder = Callable[[Argv], bytes]
Key = tuple[str, ...]

CHAIN_NAME_MAX = 28  # XT_EXTENSION_MAXNAMELEN - 1
_MASKS = [((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF).to_bytes(4, "big") for n in range(33)]
_PROBABILITY = re.compile(r"(0(\.[0-9]+)?|1(\.0+)?)\Z")
_PRINTABLE = "".join(map(chr, range(0x20, 0x7F)))
_WORD = string.ascii_letters + string.digits + "_.-"
SHAPES_FORMAT = "pykubeproxy rule shapes"
SHAPES_VERSION = 1  # bump when the file's layout or a codec's spelling changes


@dataclass(frozen=True, eq=False)
class Codec:
    """How one kind of variable value is spelled in an entry.

    `pieces` returns the byte strings a value contributes (None: not a
    canonical value, use python-iptables). `sample(slot, variant)` gives
    learning values: variants 0 and 1 differ in every piece, and slots differ
    from each other. `random` gives verification values. The option's value is
    a variable only if it starts with `prefix` (``-j KUBE-…`` is, ``-j DNAT``
    is not).
    """

    name: str
    pieces: Callable[[str], Pieces | None]
    sample: Callable[[int, int], str]
    random: Callable[[random.Random], str]
    prefix: str = ""
    placeholder: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "placeholder", "\0" + self.name)


def _decimal(value: str, low: int, high: int) -> int | None:
    """A canonical decimal (xtables reads ``0x``/leading-zero forms as hex/octal)."""
    if not (value.isascii() and value.isdigit()) or (value[0] == "0" and value != "0"):
        return None
    number = int(value)
    return number if low <= number <= high else None


def _ipv4(value: str) -> bytes | None:
    try:
        return socket.inet_pton(socket.AF_INET, value)
    except OSError:
        return None


def _addr_pieces(value: str) -> Pieces | None:
    """``-s``/``-d``: address and netmask; python-iptables masks the address."""
    addr, slash, prefix = value.partition("/")
    raw = _ipv4(addr)
    bits = _decimal(prefix, 0, 32) if slash else 32
    if raw is None or bits is None:
        return None
    if bits == 32:
        return (raw, _MASKS[32])
    mask = _MASKS[bits]
    return (bytes(a & m for a, m in zip(raw, mask, strict=True)), mask)


def _addr_sample(slot: int, variant: int) -> str:
    return (f"10.{slot + 1}.45.64/26", f"172.{slot + 16}.128.0/17")[variant]


def _random_ip(rng: random.Random) -> str:
    return str(IPv4Address(rng.getrandbits(32)))


def _addr_random(rng: random.Random) -> str:
    ip = _random_ip(rng)
    return ip if rng.random() < 0.5 else f"{ip}/{rng.randint(0, 32)}"


def _port_pieces(value: str) -> Pieces | None:
    """``--dport`` of tcp/udp/sctp: a u16 in host order."""
    port = _decimal(value, 1, 65535)
    return None if port is None else (port.to_bytes(2, HOST),)


def _u31_pieces(value: str) -> Pieces | None:
    """recent's ``--seconds``: a u32 of 1 or more, saved with ``%d`` (so at most 2^31-1)."""
    number = _decimal(value, 1, 0x7FFFFFFF)
    return None if number is None else (number.to_bytes(4, HOST),)


def _probability_pieces(value: str) -> Pieces | None:
    """statistic's ``--probability``: lround(p * 2^31) as libxt_statistic stores it."""
    if not _PROBABILITY.match(value):
        return None
    scaled = math.floor(float(value) * 2147483648.0 + 0.5)  # lround(), p >= 0
    return (scaled.to_bytes(4, HOST),)


def _probability_random(rng: random.Random) -> str:
    return f"{rng.random():.10f}" if rng.random() < 0.5 else f"{1 / rng.randint(2, 1000):.10f}"


def _ip_port_pieces(value: str) -> Pieces | None:
    """DNAT ``--to-destination ip:port``: the address, and the port in network order."""
    addr, colon, port_text = value.partition(":")
    raw = _ipv4(addr)
    port = _decimal(port_text, 1, 65535) if colon else None
    return None if raw is None or port is None else (raw, port.to_bytes(2, "big"))


def _text_codec(
    name: str, size: int, chars: str, sample: Callable[[int, int], str], prefix: str = ""
) -> Codec:
    """A NUL-padded char[size] field holding one string made of `chars`.

    python-iptables' final_check prints each option back and re-reads it with
    shlex: a comment is printed quoted, and shlex turns its ``'`` into ``\\'``;
    recent's list name is printed unquoted, so spaces or quotes would split it.
    A leading ``-`` or ``!`` reads as an option or an inversion. Values outside
    `chars` therefore take the slow path, which reproduces python-iptables.
    """
    valid = re.compile(f"(?![-!]){re.escape(prefix)}[{re.escape(chars)}]{{0,{size - 1}}}")

    def pieces(value: str) -> Pieces | None:
        if not value or len(value) >= size or not valid.fullmatch(value):
            return None
        return (value.encode().ljust(size, b"\0"),)

    def rand(rng: random.Random) -> str:
        text = "".join(rng.choices(chars, k=rng.randint(1, size - 1 - len(prefix))))
        return prefix + (text.lstrip("-!") or "x")

    return Codec(name, pieces, sample, rand, prefix)


ADDR = Codec("addr", _addr_pieces, _addr_sample, _addr_random)
PORT = Codec(
    "port",
    _port_pieces,
    lambda s, v: str((0x1234, 0x5678)[v] + s),
    lambda r: str(r.randint(1, 65535)),
)
SECONDS = Codec(
    "seconds",
    _u31_pieces,
    lambda s, v: str((0x01020304, 0x0A0B0C0D)[v] + s),
    lambda r: str(r.choice((1, r.randint(1, 86400), r.randint(1, 0x7FFFFFFF)))),
)
PROBABILITY = Codec(
    "probability", _probability_pieces, lambda s, v: f"0.{(3, 7)[v]}{s}", _probability_random
)
IP_PORT = Codec(
    "ip-port",
    _ip_port_pieces,
    lambda s, v: (f"10.{s + 1}.2.3:{0x1234 + s}", f"192.168.{s + 1}.9:{0x5678 + s}")[v],
    lambda r: f"{_random_ip(r)}:{r.randint(1, 65535)}",
)
COMMENT = _text_codec(
    "comment", 256, _PRINTABLE.replace("'", ""), lambda s, v: f"{s}{'AB'[v]}" * (10 + v)
)
RECENT_NAME = _text_codec("recent-name", 200, _WORD, lambda s, v: f"KUBE-{s}{'CD'[v]}" * (3 + v))
CHAIN = _text_codec(
    "chain", CHAIN_NAME_MAX + 1, _WORD, lambda s, v: f"KUBE-SAMPLE-{s}-{'EF'[v] * (8 + v)}", "KUBE-"
)

# The table: which option's value is a variable, and how it is spelled.
# Every other argument is literal and part of the shape.
VARIABLES: dict[str, Codec] = {
    "-s": ADDR,
    "-d": ADDR,
    "--dport": PORT,
    "--comment": COMMENT,
    "--name": RECENT_NAME,
    "--seconds": SECONDS,
    "--probability": PROBABILITY,
    "--to-destination": IP_PORT,
    "-j": CHAIN,
}
_BY_PLACEHOLDER = {codec.placeholder: codec for codec in VARIABLES.values()}


def split(argv: Argv) -> tuple[Key, list[str]]:
    """The rule's shape (variables replaced by placeholders) and its variable values."""
    key = list(argv)
    values: list[str] = []
    get = VARIABLES.get
    for i in range(1, len(argv)):
        codec = get(argv[i - 1])
        if codec is not None and argv[i].startswith(codec.prefix):
            key[i] = codec.placeholder
            values.append(argv[i])
    return tuple(key), values


def _fill_argv(key: Key, values: Iterable[str]) -> Argv:
    """The argument vector of a shape with these variable values."""
    it = iter(values)
    return tuple(next(it) if arg in _BY_PLACEHOLDER else arg for arg in key)


def python_iptables_entry(argv: Argv) -> bytes:
    """The slow path's bytes: `build_rule`, `final_check()` and the rule buffer."""
    rule = build_rule(argv)
    rule.final_check()
    return bytes(rule.rule)


@dataclass(frozen=True)
class Shape:
    """A learned shape: the template, and where each variable's pieces go."""

    template: bytes
    codecs: tuple[Codec, ...]
    spots: tuple[tuple[tuple[int, int], ...], ...]  # per variable: (piece index, offset)


class ShapeMismatch(Exception):
    """Learning or verification showed the encoder would not match python-iptables."""


def _occurrences(data: bytes, piece: bytes) -> Iterator[int]:
    start = data.find(piece)
    while start >= 0:
        yield start
        start = data.find(piece, start + 1)


class EntryEncoder:
    """Fast, verified ipt_entry encoding per rule shape (see the module docstring).

    `build` is the reference (python-iptables); `samples` are real rules whose
    shapes are learned and checked at construction (the renderer's
    `sample_rules()` covers every rule it emits). Shapes first seen later
    are learned and checked the same way on first use, up to `max_shapes`: a
    literal that varied per rule would otherwise make every rule a new shape.
    `unverified` shapes (from `from_file`) are checked on their first rule.
    """

    def __init__(
        self,
        samples: Iterable[Argv],
        *,
        build: Builder = python_iptables_entry,
        checks: int = 4,
        seed: int = 0,
        max_shapes: int = 256,
        unverified: Mapping[Key, Shape] | None = None,
    ) -> None:
        self._build = build
        self._checks = checks
        self._max_shapes = max_shapes
        self._rng = random.Random(seed)
        self._shapes: dict[Key, Shape | None] = {}
        self._unverified = dict(list((unverified or {}).items())[:max_shapes])
        self.encoded = 0
        self.fallbacks = 0
        self.learned = 0  # shapes learned here (not loaded): what a saved file lacks
        examples: dict[Key, list[Argv]] = {}
        for argv in samples:
            examples.setdefault(split(argv)[0], []).append(argv)
        for key, argvs in examples.items():
            self._learn(key, argvs[:3])

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> EntryEncoder | None:
        """An encoder holding the shapes saved in `path`, unverified; None without a usable file.

        Nothing is built here: each shape costs one python-iptables build on its first rule.
        """
        shapes = read_shapes(path)
        return None if shapes is None else cls((), unverified=shapes, **options)

    def save(self, path: str | Path) -> None:
        """Write the shapes known so far (learned, checked or still unverified) to `path`.

        Atomic (a temporary file renamed over `path`), so a reader never sees half a
        file; creates the directory. Raises OSError when that fails.
        """
        known = {key: shape for key, shape in self._shapes.items() if shape is not None}
        known.update(self._unverified)
        document = {
            "format": SHAPES_FORMAT,
            "version": SHAPES_VERSION,
            "shapes": [_shape_record(key, shape) for key, shape in known.items()],
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(document) + "\n")
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    @property
    def shapes(self) -> int:
        """How many shapes are encoded fast."""
        return sum(shape is not None for shape in self._shapes.values())

    @property
    def disabled(self) -> list[Argv]:
        """Shapes left to python-iptables (placeholders shown as ``<kind>``)."""
        return [_shown(key) for key, shape in self._shapes.items() if shape is None]

    def encode(self, argv: Argv) -> bytes | None:
        """The rule's entry, or None when python-iptables must build it."""
        key, values = split(argv)
        shape = self._shapes.get(key)
        if shape is None and key not in self._shapes:
            if key in self._unverified:
                shape = self._check_loaded(key, argv, values)
            elif len(self._shapes) < self._max_shapes:
                shape = self._learn(key, [argv])
        entry = None if shape is None else self._fill(shape, values)
        if entry is None:
            self.fallbacks += 1
        else:
            self.encoded += 1
        return entry

    @staticmethod
    def _fill(shape: Shape, values: list[str]) -> bytes | None:
        buf = bytearray(shape.template)
        for codec, value, spots in zip(shape.codecs, values, shape.spots, strict=True):
            pieces = codec.pieces(value)
            if pieces is None:
                return None
            for index, offset in spots:
                piece = pieces[index]
                buf[offset : offset + len(piece)] = piece
        return bytes(buf)

    def _check_loaded(self, key: Key, argv: Argv, values: list[str]) -> Shape | None:
        """Trust a loaded shape once it gives python-iptables' bytes for this rule, else relearn.

        A value the shape cannot spell leaves it unverified: python-iptables builds that
        rule, and the next rule of the shape is the check.
        """
        shape = self._unverified[key]
        entry = self._fill(shape, values)
        if entry is None:
            return None
        del self._unverified[key]
        try:
            same = entry == self._reference(key, values)
        except Exception:  # python-iptables refuses the rule: learning will say why
            same = False
        if same:
            self._shapes[key] = shape
            return shape
        log.info(
            "fast rule encoder: the saved shape of [%s] differs from python-iptables here; "
            "learning it afresh",
            " ".join(_shown(key)),
        )
        return self._learn(key, [argv])

    def _reference(self, key: Key, values: list[str]) -> bytes:
        chains = [v for v, arg in zip(values, _slots(key), strict=True) if arg is CHAIN]
        with resolving_chains(chains):
            return self._build(_fill_argv(key, values))

    def _learn(self, key: Key, examples: list[Argv]) -> Shape | None:
        """Learn, verify and remember a shape (None: it stays on python-iptables)."""
        shape: Shape | None = None
        try:
            shape = self._locate(key)
            self._verify(key, shape, examples)
        except Exception as err:
            shown = " ".join(_shown(key))
            log.warning("fast rule encoder: python-iptables builds [%s] itself: %s", shown, err)
            shape = None
        self._shapes[key] = shape
        self.learned += shape is not None
        if len(self._shapes) == self._max_shapes:
            log.warning(
                "fast rule encoder: %d shapes, new ones are left to python-iptables",
                len(self._shapes),
            )
        return shape

    def _locate(self, key: Key) -> Shape:
        """Find each variable's bytes by changing one variable at a time."""
        codecs = _slots(key)
        base_values = [codec.sample(slot, 0) for slot, codec in enumerate(codecs)]
        base = self._reference(key, base_values)
        taken: set[int] = set()
        spots: list[tuple[tuple[int, int], ...]] = []
        for slot, codec in enumerate(codecs):
            values = list(base_values)
            values[slot] = codec.sample(slot, 1)
            other = self._reference(key, values)
            if len(other) != len(base):
                raise ShapeMismatch(f"{codec.name} changes the entry size")
            changed = {i for i, (a, b) in enumerate(zip(base, other, strict=True)) if a != b}
            before, after = codec.pieces(base_values[slot]), codec.pieces(values[slot])
            if before is None or after is None:
                raise ShapeMismatch(f"{codec.name} rejects its own samples")
            found: list[tuple[int, int]] = []
            for index, (old, new) in enumerate(zip(before, after, strict=True)):
                hits = [o for o in _occurrences(base, old) if other[o : o + len(new)] == new]
                if old == new or not hits:
                    raise ShapeMismatch(f"{codec.name} piece {index} not found")
                found += [(index, offset) for offset in hits]
            covered = {o + i for index, o in found for i in range(len(before[index]))}
            if changed - covered:
                raise ShapeMismatch(f"{codec.name} changes bytes it does not explain")
            if covered & taken:
                raise ShapeMismatch(f"{codec.name} overlaps another variable")
            taken |= covered
            spots.append(tuple(found))
        return Shape(base, codecs, tuple(spots))

    def _verify(self, key: Key, shape: Shape, examples: list[Argv]) -> None:
        """Compare with python-iptables on the examples and on random values."""
        trials = [split(argv)[1] for argv in examples]
        trials += [[codec.random(self._rng) for codec in shape.codecs] for _ in range(self._checks)]
        for values in trials:
            if self._fill(shape, values) != self._reference(key, values):
                raise ShapeMismatch(f"differs from python-iptables for {values}")


def _slots(key: Key) -> tuple[Codec, ...]:
    return tuple(_BY_PLACEHOLDER[arg] for arg in key if arg in _BY_PLACEHOLDER)


def _shown(key: Key) -> Argv:
    """A shape for people: placeholders written as ``<kind>``."""
    return tuple(f"<{arg[1:]}>" if arg in _BY_PLACEHOLDER else arg for arg in key)


def _shape_record(key: Key, shape: Shape) -> dict[str, Any]:
    """A shape as saved: the rule with placeholders, codec names, template and spots."""
    return {
        "rule": list(key),
        "codecs": [codec.name for codec in shape.codecs],
        "template": shape.template.hex(),
        "spots": [[list(spot) for spot in spots] for spots in shape.spots],
    }


def _shape_from(record: Any) -> tuple[Key, Shape]:
    """A saved shape, checked to be self-consistent (python-iptables checks it on first use).

    Raises ValueError (or TypeError, KeyError) when the record does not fit its rule.
    """
    key = tuple(record["rule"])
    if not all(isinstance(arg, str) for arg in key):
        raise ValueError("the rule is not a list of strings")
    codecs = _slots(key)
    if record["codecs"] != [codec.name for codec in codecs]:
        raise ValueError(f"[{' '.join(_shown(key))}]: codecs {record['codecs']} do not fit it")
    template = bytes.fromhex(record["template"])
    spots = tuple(tuple((index, offset) for index, offset in spots) for spots in record["spots"])
    if len(spots) != len(codecs):
        raise ValueError(f"[{' '.join(_shown(key))}]: {len(spots)} spots for {len(codecs)} values")
    for codec, codec_spots in zip(codecs, spots, strict=True):
        sizes = [len(piece) for piece in codec.pieces(codec.sample(0, 0)) or ()]
        for index, offset in codec_spots:
            if not (
                type(index) is int
                and type(offset) is int
                and 0 <= index < len(sizes)
                and 0 <= offset <= len(template) - sizes[index]
            ):
                raise ValueError(f"[{' '.join(_shown(key))}]: {codec.name} spot out of range")
    return key, Shape(template, codecs, spots)


def read_shapes(path: str | Path) -> dict[Key, Shape] | None:
    """The shapes saved in `path`; None (and one log line) when there is no usable file.

    A saved shape that does not fit its rule is left out, to be learned afresh.
    """
    try:
        document = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        log.debug("no saved rule shapes at %s", path)
        return None
    except (OSError, ValueError) as err:
        log.info("ignoring the saved rule shapes at %s: %s", path, err)
        return None
    if not (
        isinstance(document, dict)
        and document.get("format") == SHAPES_FORMAT
        and document.get("version") == SHAPES_VERSION
        and isinstance(document.get("shapes"), list)
    ):
        log.info("ignoring %s: not version %d of saved rule shapes", path, SHAPES_VERSION)
        return None
    shapes: dict[Key, Shape] = {}
    for record in document["shapes"]:
        try:
            key, shape = _shape_from(record)
        except (ValueError, TypeError, KeyError) as err:
            log.info("saved rule shapes at %s: one is learned afresh: %s", path, err)
            continue
        shapes[key] = shape
    return shapes
