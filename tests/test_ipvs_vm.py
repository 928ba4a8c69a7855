"""Boot one VM on the distribution kernel and run the IPVS tests (tests/ipvs) inside it.

This machine's kernel may lack ip_vs; pykubeproxy.sandbox.vm boots Debian's kernel under
QEMU with the host's filesystem, where ``pytest tests/ipvs -m ipvs`` runs as root with
``PYKUBEPROXY_IN_VM=1``. This test fails with the guest's output if the guest run fails,
runs no test, skips one, or the VM cannot start. Only outside CI, and only when qemu,
virtme-ng, busybox or the kernel are not installed, is it skipped instead.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from pykubeproxy.sandbox.vm import VmMissing, VmUnavailable, in_vm, run_in_vm

ROOT = Path(__file__).resolve().parent.parent
GUEST_PYTEST = ["-m", "pytest", "tests/ipvs", "-m", "ipvs", "-p", "no:cacheprovider", "-q"]
# Seconds, boot included. Emulated (TCG) runs take 20-25 min, ~9 of them the three-node
# packet tests (three agents on one emulated CPU); KVM runs take a few minutes.
TIMEOUT = 2400.0
_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")
_COUNT = re.compile(r"(\d+) (\w+)")


def summary(output: str) -> tuple[str, dict[str, int]]:
    """pytest's final "N passed, M skipped in Ts" line and its counts by outcome."""
    for line in reversed(output.splitlines()):
        if match := _SUMMARY.match(line.strip()):
            counts = {word: int(n) for n, word in _COUNT.findall(match.group(1))}
            return line.strip(" ="), counts
    return "", {}


def test_ipvs_suite_in_vm(capsys: pytest.CaptureFixture[str]) -> None:
    if in_vm():
        pytest.skip("already inside the VM")
    try:
        result = run_in_vm([sys.executable, *GUEST_PYTEST], timeout=TIMEOUT, cwd=str(ROOT))
    except VmMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the IPVS tests, but the VM is not installed: {exc}")
        pytest.skip(f"IPVS VM not installed (make setup installs it): {exc}")
    except VmUnavailable as exc:
        pytest.fail(f"the IPVS VM could not start: {exc}")
    line, counts = summary(result.output)
    timing = f"{result.accel}, boot {result.boot_seconds:.0f}s, total {result.seconds:.0f}s"
    problems = [
        *([f"exit status {result.returncode}"] if result.returncode else []),
        *(["timed out"] if result.timed_out else []),
        *([] if counts.get("passed") else ["no test passed"]),
        *([f"{counts['skipped']} skipped in the VM"] if counts.get("skipped") else []),
    ]
    if problems:
        pytest.fail(
            f"guest pytest: {', '.join(problems)} ({timing})\n--- guest output ---\n"
            f"{result.output}",
            pytrace=False,
        )
    with capsys.disabled():
        print(f"\n[ipvs vm] {line} ({timing}, peak RSS {result.max_rss_mib:.0f} MiB)")
