"""Run a command as root inside a throwaway VM booted on the distribution's own kernel.

Why: the IPVS proxy mode programs the kernel's IP Virtual Server through netlink, and its
tests need a kernel that has ``ip_vs`` (plus ``dummy``, ``veth``, ``br_netfilter``). CI
machines and containers often run kernels without them and cannot load modules. Debian's
stock kernel (package ``linux-image-amd64``) has them all as modules, so we boot it under
QEMU with virtme-ng: the guest sees the host's filesystem read-only (9p/virtiofs), with
copy-on-write tmpfs overlays on /etc, /usr, /var, /tmp, /home, /opt, /srv, and a private /run,
so it can run this checkout and its venv unchanged while writes never reach the host. The
project directory itself is read-only in the guest: no byte code, no pytest cache there.

The guest is started as (see :func:`vng_command`)::

    vng --run /boot/vmlinuz-<ver> --memory 2G --cpus 1 --exec 'sh /tmp/pkp-vm-XXXX.sh' --disable-kvm

where the script (a file: the kernel command line that carries ``--exec`` is short) exports a
clean environment (the venv first on PATH, ``PYKUBEPROXY_IN_VM=1``), loads the modules, enters
``cwd`` and runs the command between two marker lines that carry a per-run random token. The
markers tell "the VM never got ready" (:class:`VmUnavailable`, or :class:`VmMissing` when a
prerequisite is not installed) apart from "the command ran and failed" (a :class:`VmResult`
with a non-zero ``returncode``).

KVM is used only when it is hardware-backed (``kvm_intel``/``kvm_amd`` loaded); a bare
``/dev/kvm`` can be a paravirtual one (e.g. ``kvm_pvm`` in nested cloud sandboxes) that hangs
a stock kernel at boot. Otherwise QEMU emulates (TCG): boot ~15-35 s, Python ~30x slower,
and one vCPU (two emulated vCPUs on a busy host spin on each other: 2-3x slower, erratic).
``PYKUBEPROXY_VM_ACCEL=kvm|tcg`` and ``PYKUBEPROXY_VM_KERNEL=/boot/vmlinuz-...`` override.

CLI: ``python -m pykubeproxy.sandbox.vm [--memory 2G] [--timeout S] -- ipvsadm -Ln``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

__all__ = [
    "IN_VM_ENV",
    "IPVS_MODULES",
    "Kernel",
    "VmMissing",
    "VmResult",
    "VmUnavailable",
    "find_kernel",
    "in_vm",
    "kvm_usable",
    "run_in_vm",
    "vng_command",
]

IN_VM_ENV = "PYKUBEPROXY_IN_VM"
ACCEL_ENV = "PYKUBEPROXY_VM_ACCEL"
KERNEL_ENV = "PYKUBEPROXY_VM_KERNEL"
#: What the IPVS mode and its tests need; loaded in the guest before the command runs.
IPVS_MODULES = (
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "nf_conntrack", "br_netfilter", "dummy", "veth",
)  # fmt: skip
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core CI machine boots in 10-40 s
QEMU = "qemu-system-x86_64"
_GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KO_RE = re.compile(r"\.ko(\.(xz|zst|gz))?$")


class VmUnavailable(RuntimeError):
    """The VM could not start or get ready (boot failure, boot timeout): nothing ran."""


class VmMissing(VmUnavailable):
    """A prerequisite is not installed: qemu, virtme-ng, busybox, or a kernel with ip_vs."""


@dataclass(frozen=True)
class Kernel:
    image: Path
    version: str
    moddir: Path


@dataclass(frozen=True)
class VmResult:
    """The command's exit status and output (stdout and stderr merged, marker lines removed)."""

    returncode: int
    output: str
    accel: str  # "kvm" or "tcg"
    boot_seconds: float  # from start until the guest was about to run the command
    seconds: float  # end to end
    max_rss_mib: float  # peak RSS of vng and its children (QEMU dominates)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def in_vm() -> bool:
    """True inside a guest started by :func:`run_in_vm`."""
    return os.environ.get(IN_VM_ENV) == "1"


def _module_names(moddir: Path) -> set[str]:
    """Module names (``-`` as ``_``) a kernel has, loadable or built in."""
    names: set[str] = set()
    for index in ("modules.dep", "modules.builtin"):
        with contextlib.suppress(OSError):
            for line in (moddir / index).read_text().splitlines():
                path = line.split(":", 1)[0]
                names.add(_KO_RE.sub("", path.rsplit("/", 1)[-1]).replace("-", "_"))
    return names


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"(\d+)", version)]


def find_kernel(modules: Iterable[str] = IPVS_MODULES) -> Kernel:
    """The newest ``/boot/vmlinuz-<ver>`` whose ``/lib/modules/<ver>`` has all ``modules``."""
    wanted = set(modules)
    override = os.environ.get(KERNEL_ENV)
    images = [Path(override)] if override else sorted(Path("/boot").glob("vmlinuz-*"))
    rejected: list[str] = []
    found: list[Kernel] = []
    for image in images:
        version = image.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        lacking = wanted - _module_names(moddir)
        if not image.is_file():
            rejected.append(f"{image}: no such file")
        elif lacking:
            rejected.append(f"{image}: {moddir} lacks {', '.join(sorted(lacking))}")
        elif not os.access(image, os.R_OK):
            rejected.append(f"{image}: not readable (Debian installs it 0600; run as root)")
        else:
            found.append(Kernel(image, version, moddir))
    if not found:
        why = "; ".join(rejected) or "no /boot/vmlinuz-*"
        raise VmMissing(f"no usable kernel ({why}); install one: apt-get install linux-image-amd64")
    return max(found, key=lambda k: _version_key(k.version))


def kvm_usable() -> tuple[bool, str]:
    """Whether to use KVM, and why (see the module docstring)."""
    forced = os.environ.get(ACCEL_ENV, "").lower()
    if forced in ("kvm", "tcg"):
        return forced == "kvm", f"{ACCEL_ENV}={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    for mod in ("kvm_intel", "kvm_amd"):
        if Path("/sys/module", mod).is_dir():
            return True, f"/dev/kvm backed by {mod}"
    return False, "/dev/kvm is not hardware-backed (no kvm_intel/kvm_amd)"


def _vng() -> str:
    """The vng of this interpreter's environment (it runs virtme-run, found on PATH)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "vng", shutil.which("vng")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise VmMissing("virtme-ng is not installed: pip install virtme-ng (the project's dev extra)")


def _check_host_tools() -> None:
    if shutil.which(QEMU) is None:
        raise VmMissing(f"{QEMU} not found: apt-get install qemu-system-x86")
    # A distribution kernel has virtio as modules, so virtme-ng builds an initramfs around a
    # static busybox (the dynamic one cannot run there).
    if not any(shutil.which(b) for b in ("busybox-static", "busybox.static", "busybox")):
        raise VmMissing("busybox not found (virtme-ng's initramfs needs it): apt-get install "
                        "busybox-static")  # fmt: skip


def vng_command(kernel: Kernel, script: str, *, memory: str, cpus: int, kvm: bool) -> list[str]:
    """The vng command line that boots ``kernel`` and runs ``sh script`` as root."""
    argv = [_vng(), "--run", str(kernel.image), "--memory", memory, "--cpus", str(cpus)]
    return [*argv, "--exec", f"sh {script}", *([] if kvm else ["--disable-kvm"])]


def _guest_script(
    command: Sequence[str], cwd: str, env: Mapping[str, str], modules: Sequence[str], token: str
) -> str:
    exports = {
        "PATH": f"{sysconfig.get_path('scripts')}:{_GUEST_PATH}",
        IN_VM_ENV: "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only in the guest
        "PYTHONUNBUFFERED": "1",  # stream output as it comes
        **({"CI": os.environ["CI"]} if "CI" in os.environ else {}),
        **env,
    }
    q = shlex.quote
    modprobe = shlex.join(["modprobe", "-a", *modules])
    lines = [
        f"fail() {{ echo '@@{token} setup-failed:' \"$1\"; exit 1; }}",
        *(f"export {k}={q(v)}" for k, v in exports.items()),
        f"{modprobe} || fail {q(modprobe)}" if modules else ":",
        f"cd {q(cwd)} || fail {q(f'cd {cwd}')}",
        f"echo '@@{token} ready'",
        shlex.join(command),
        f'echo "@@{token} exit $?"',
    ]
    return "\n".join(lines) + "\n"


def _pump(pipe: IO[str], lines: queue.Queue[str | None]) -> None:
    try:
        for line in pipe:
            lines.put(line)
    finally:
        lines.put(None)


def _reap(proc: subprocess.Popen[str], grace: float) -> resource.struct_rusage | None:
    """Wait for vng to exit (up to grace seconds) and return its and its children's usage."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        time.sleep(0.05)
    return None


def _stop(proc: subprocess.Popen[str]) -> None:
    """End vng and the QEMU under it: its own process group, started by us."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def run_in_vm(
    command: list[str],
    *,
    timeout: float,
    memory: str = "2G",
    cpus: int | None = None,
    cwd: str,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = IPVS_MODULES,
    boot_timeout: float = BOOT_TIMEOUT,
    stream: TextIO | None = None,
    verbose: bool = False,
) -> VmResult:
    """Boot the VM once, run ``command`` as root in ``cwd`` inside it, power off.

    ``timeout`` bounds everything (boot included); ``boot_timeout`` bounds the boot alone.
    Output lines are written to ``stream`` as they arrive (if given) and returned.
    ``verbose`` adds the kernel console to the output (to debug boot failures).
    Raises :class:`VmUnavailable` (:class:`VmMissing`) if the command could not be started;
    a command that fails, times out or dies with the guest yields a non-ok result.
    """
    if not Path(cwd).is_dir():
        raise ValueError(f"cwd {cwd!r} is not a directory")
    _check_host_tools()
    kernel = find_kernel(modules)
    kvm, _ = kvm_usable()
    if cpus is None:
        cpus = min(2, os.cpu_count() or 1) if kvm else 1
    token = secrets.token_hex(8)
    marker = f"@@{token} "
    fd, script = tempfile.mkstemp(prefix="pkp-vm-", suffix=".sh", dir="/tmp")  # guest sees /tmp
    with os.fdopen(fd, "w") as fh:
        fh.write(_guest_script(command, cwd, env or {}, modules, token))
    argv = vng_command(kernel, script, memory=memory, cpus=cpus, kvm=kvm)
    if verbose:
        argv.append("--verbose")
    path = f"{sysconfig.get_path('scripts')}:{os.environ.get('PATH', _GUEST_PATH)}"
    host_env = {**os.environ, "PATH": path}  # vng runs virtme-run from PATH
    start = time.monotonic()
    out: list[str] = []
    boot_seconds: float | None = None
    exit_code: int | None = None
    setup_error = ""
    timed_out = eof = False
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=host_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        os.unlink(script)
        raise VmMissing(f"cannot run {argv[0]}: {exc}") from exc
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        while True:
            limit = timeout if boot_seconds is not None else min(timeout, boot_timeout)
            try:
                line = lines.get(timeout=max(0.0, start + limit - time.monotonic()))
            except queue.Empty:
                timed_out = exit_code is None  # else only the power-off hangs
                break
            if line is None:
                eof = True
                break
            before, found, what = line.partition(marker)
            if found:  # a marker, maybe after output that did not end with a newline
                line, what = before and f"{before}\n", what.strip()
                if what == "ready":
                    boot_seconds = time.monotonic() - start
                elif what.startswith("exit "):
                    exit_code = int(what.split()[1])
                else:
                    setup_error = what
            if not line:
                continue
            out.append(line)
            if stream is not None:
                stream.write(line)
                stream.flush()
    finally:
        usage = _reap(proc, 30.0) if eof else None  # at EOF vng is exiting
        _stop(proc)
        os.unlink(script)
    seconds = time.monotonic() - start
    output = "".join(out)
    accel = "kvm" if kvm else "tcg"
    if boot_seconds is None:
        tail = "\n".join(output.splitlines()[-30:])
        if setup_error:
            why = f"guest setup failed: {setup_error}"
        elif timed_out:
            why = f"VM did not boot within {min(timeout, boot_timeout):.0f}s ({accel})"
        else:
            why = f"VM failed to boot (vng exit status {proc.returncode}, {accel})"
        raise VmUnavailable(f"{why}; kernel {kernel.image}; rerun with verbose for the console"
                            + (f"\n{tail}" if tail else ""))  # fmt: skip
    if exit_code is None:
        note = "timed out" if timed_out else "the guest died before the command finished"
        output += f"\n[vm] {note} after {seconds:.0f}s\n"
    rss = (usage.ru_maxrss if usage else 0) / 1024
    return VmResult(
        returncode=124 if timed_out else (255 if exit_code is None else exit_code),
        output=output, accel=accel, boot_seconds=boot_seconds, seconds=seconds,
        max_rss_mib=rss, timed_out=timed_out,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pykubeproxy.sandbox.vm",
        description="Run a command as root in a VM on the Debian kernel (ip_vs etc. loaded).",
    )
    parser.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    parser.add_argument("--cpus", type=int, help="guest CPUs (default 2 with KVM, 1 without)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds, boot included")
    parser.add_argument("--verbose", action="store_true", help="show the kernel console")
    parser.add_argument("command", nargs="+", help="the command, after --")
    args = parser.parse_args(argv)
    try:
        result = run_in_vm(
            args.command, timeout=args.timeout, memory=args.memory, cpus=args.cpus, cwd=os.getcwd(),
            stream=sys.stdout, verbose=args.verbose,
        )  # fmt: skip
    except VmUnavailable as exc:
        print(f"[vm] {exc}", file=sys.stderr)
        return 125
    print(
        f"[vm] {result.accel}: booted in {result.boot_seconds:.1f}s, exit {result.returncode} "
        f"after {result.seconds:.1f}s, peak RSS {result.max_rss_mib:.0f} MiB",
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
