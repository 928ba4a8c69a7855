"""The fast encoder's saved rule shapes, shipped in the package, and the command that
makes them.

    python -m pykubeproxy.iptables.shapes [PATH]

learns every shape of `sample_rules()` from python-iptables, checks it, and saves it to
PATH (by default the file the package ships, `rule-shapes.json` beside this module). It
needs neither root nor the kernel: `resolving_chains` answers python-iptables' only
question to the tables. Run unprivileged, libxtables cannot ask the kernel which extension
revisions it supports and takes the newest it knows, which is what a current kernel
supports; the agent checks each saved shape against its own python-iptables anyway (see
`encoder.py`). Run it again when the renderer's rules or python-iptables change: a unit
test fails while the shipped file is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pykubeproxy.iptables.encoder import EntryEncoder
from pykubeproxy.iptables.render import sample_rules

SHIPPED_SHAPES = Path(__file__).with_name("rule-shapes.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pykubeproxy.iptables.shapes",
        description="Learn the renderer's rule shapes and save them for the agent's encoder.",
    )
    parser.add_argument("path", nargs="?", default=str(SHIPPED_SHAPES), help="file to write")
    path = parser.parse_args(argv).path
    encoder = EntryEncoder(sample_rules())
    encoder.save(path)
    print(f"{encoder.shapes} rule shapes saved to {path}", file=sys.stderr)
    for shape in encoder.disabled:  # learning logged why; the image must not ship a gap
        print(f"not encodable: {' '.join(shape)}", file=sys.stderr)
    return 1 if encoder.disabled else 0


if __name__ == "__main__":
    sys.exit(main())
