"""Put the kernel under test on every selected host, per the inventory entry's ``provision``.

``none``
    The host already runs the kernel under test; nothing is done. For a real (kvm) host that means
    the baseline and the candidate run on whatever kernel it booted, so the gate notes it in gate.md
    when both report the same ``uname -r``: only the farm's operator knows that such a comparison
    is meaningful (e.g. the baseline was stored from an earlier boot).

``kexec`` / ``reboot`` (real hosts, over SSH with fabric)
    ``make -s kernelrelease`` names the release R; ``make modules_install INSTALL_MOD_PATH=stage``
    stages the modules; ``arch/x86/boot/bzImage`` and a tarball of ``lib/modules/R`` are copied to
    the host, unpacked into ``/lib/modules/R``, installed as ``/boot/vmlinuz-R`` and, where the host
    has it, registered with ``kernel-install add R /boot/vmlinuz-R`` (its initramfs/bootloader hooks
    run there). ``kexec`` then loads ``/boot/vmlinuz-R`` with the host's ``/boot/initrd.img-R`` (or
    ``initramfs-R.img``) and the running command line plus a boot marker ``pmufarm.boot=<token>``
    (``kexec -l --command-line``; an earlier marker is replaced) and jumps (``systemctl kexec`` under
    systemd, else ``kexec -e``); ``reboot`` does ``systemctl reboot`` (kernel-install makes R the
    default entry on BLS systems), or ``reboot`` without systemd.
    The host counts as back when, over SSH, its ``/proc/sys/kernel/random/boot_id`` differs from the
    one read before the switch, ``uname -r`` is R and, for kexec, ``/proc/cmdline`` holds the marker;
    with a farm broker (FARM_BROKER_URL) its agent must then also report ``kernel.release == R``
    (``probe_facts`` on its own queue). A host that is not back within ``--provision-timeout``
    makes the gate ``inconclusive`` (exit 3) naming it: an infrastructure failure, never a kernel
    regression. A ``local`` host is never kexec'd or rebooted by the gate. Host keys are checked
    strictly against ``--known-hosts`` (default ``~/.ssh/known_hosts``), as ``orchestrator deploy``
    does. Proven against a QEMU VM acting as a farm host: tests/test_gate_kexec.py.

Simulated hosts (``driver: model``)
    There is no kernel to boot; the kernel under test is *mapped to injected faults*. The built
    tree's ``pmufarm-sim.yaml`` (``{<uarch glob>: [fault ids]}``, see ``build.py``) says which faults
    of ``inventory/faults.yaml`` that kernel exhibits on which microarchitecture. Each simulated
    host's ``model.faults`` becomes its inventory faults (a property of the host, kept) plus the
    faults the kernel maps to on its uarch: from the baseline worktree for the baseline run, from
    the candidate worktree for the candidate run and its re-runs. So a series adding
    ``sapphirerapids: [filter_ignored]`` "breaks" the event filter on Sapphire Rapids hosts only. The
    kernel-induced faults are recorded per host in the run meta (``gate.kernel_faults``) so baseline
    matching can tell them apart from the host's own.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.gate.build import Build, faults_for
from orchestrator.gate.common import GateError
from orchestrator.inventory import Host


@dataclass
class Provisioned:
    hosts: list[Host]
    kernel_faults: dict[str, list[str]] = field(default_factory=dict)
    releases: dict[str, str] = field(default_factory=dict)
    boots: dict[str, dict[str, str | None]] = field(default_factory=dict)  # host -> boot_id before, marker
    notes: list[str] = field(default_factory=list)


@dataclass
class SshOptions:
    """How the gate reaches real hosts: strict host keys, optional identity files."""
    known_hosts: list[Path] = field(default_factory=list)  # empty: ~/.ssh/known_hosts, /etc/ssh/ssh_known_hosts
    identities: list[str] = field(default_factory=list)
    connect_timeout: float = 20.0


def provision(hosts: list[Host], build: Build, timeout: float, echo: Any = print,
              ssh: SshOptions | None = None) -> Provisioned:
    ssh = ssh or SshOptions()
    out = Provisioned(hosts=[])
    real = [h for h in hosts if h.driver != "model" and h.provision != "none"]
    release = kernel_release(build) if real else None
    for h in hosts:
        if h.driver == "model":
            assert h.model is not None
            # Only faults the host does not already have count as the kernel's (host class stays stable).
            kfaults = [f for f in faults_for(build.sim_faults, h.model.uarch) if f not in h.model.faults]
            faults = sorted(set(h.model.faults) | set(kfaults))
            out.hosts.append(h.model_copy(update={"model": h.model.model_copy(update={"faults": faults})}))
            out.kernel_faults[h.name] = kfaults
            continue
        out.hosts.append(h)
        if h.provision == "none":
            continue
        assert release is not None
        echo(f"provision {h.name}: {h.provision} into {release}")
        boot = install_kernel(h, build, release, ssh)
        wait_for_return(h, release, boot, timeout, ssh)
        out.releases[h.name] = release
        out.boots[h.name] = {"boot_id_before": boot.boot_id, "token": boot.token}
    return out


def kernel_release(build: Build) -> str:
    proc = subprocess.run(["make", "-s", "kernelrelease"], cwd=build.worktree, capture_output=True, text=True)
    release = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not release:
        raise GateError(2, "build-failed", f"{build.role}: 'make -s kernelrelease' gave no release in "
                                           f"{build.worktree}: {proc.stderr.strip()[:200]}")
    return release


@dataclass
class Boot:
    """What identifies the switch: the boot before it, and the marker the new kernel's command line carries."""
    boot_id: str
    token: str | None


def connect(host: Host, ssh: SshOptions) -> Any:
    """An open fabric Connection to ``host`` that refuses unknown or changed host keys."""
    import paramiko
    from fabric import Connection

    kw: dict[str, Any] = {"banner_timeout": ssh.connect_timeout, "auth_timeout": ssh.connect_timeout}
    if ssh.identities:
        kw |= {"key_filename": ssh.identities, "look_for_keys": False, "allow_agent": False}
    c = Connection(host.address, user=host.user, port=host.port or 22, connect_timeout=ssh.connect_timeout,
                   connect_kwargs=kw)
    # Fabric accepts any host key by default (AutoAddPolicy) and loads no known_hosts (fabric#2071).
    known = ssh.known_hosts or [p for p in (Path("~/.ssh/known_hosts").expanduser(),
                                            Path("/etc/ssh/ssh_known_hosts")) if p.exists()]
    for kh in known:
        c.client.load_host_keys(str(kh))
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.open()
    return c


def _root(c: Any, script: str, timeout: float = 300) -> str:
    """Run ``script`` with sh as root (sudo -n for a non-root login); its stdout."""
    cmd = f"sh -c {shlex.quote(script)}"
    if c.user != "root":
        cmd = "sudo -n " + cmd
    return c.run(cmd, hide=True, in_stream=False, timeout=timeout).stdout


def install_kernel(host: Host, build: Build, release: str, ssh: SshOptions | None = None) -> Boot:
    """Copy bzImage + modules to the host and switch to it (kexec or reboot); see the module docstring."""
    if host.address == "local":
        raise GateError(2, "input-error", f"host {host.name}: provision {host.provision} on address 'local' "
                                          "would reboot the machine running the gate; use provision: none")
    image = build.worktree / "arch" / "x86" / "boot" / "bzImage"
    if not image.exists():
        raise GateError(2, "build-failed", f"{build.role} build left no {image} (does --build-cmd build bzImage?)")
    with tempfile.TemporaryDirectory(prefix="pmufarm-kernel-") as tmp:
        stage = Path(tmp) / "stage"
        proc = subprocess.run(["make", "-s", f"INSTALL_MOD_PATH={stage}", "modules_install"], cwd=build.worktree,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise GateError(2, "build-failed", f"modules_install failed: {proc.stderr.strip()[-300:]}")
        tarball = Path(tmp) / f"modules-{release}.tar.gz"
        subprocess.run(["tar", "-C", str(stage), "-czf", str(tarball), f"lib/modules/{release}"], check=True)
        return switch_kernel(host, image, tarball, release, ssh or SshOptions())


def switch_kernel(host: Host, image: Path, modules: Path | None, release: str, ssh: SshOptions) -> Boot:
    """Install ``image`` (and the ``lib/modules/R`` tarball) on the host as R and kexec or reboot into it."""
    r = shlex.quote(release)
    token = secrets.token_hex(6) if host.provision == "kexec" else None
    try:
        with connect(host, ssh) as c:
            boot_id = _root(c, "cat /proc/sys/kernel/random/boot_id", 30).strip()
            c.put(str(image), f"/tmp/vmlinuz-{release}")
            if modules is not None:
                c.put(str(modules), f"/tmp/modules-{release}.tar.gz")
                _root(c, f"tar -C / -xzf /tmp/modules-{r}.tar.gz && rm -f /tmp/modules-{r}.tar.gz")
            _root(c, f"mkdir -p /boot && cp /tmp/vmlinuz-{r} /boot/vmlinuz-{r} && chmod 0644 /boot/vmlinuz-{r} && "
                     f"rm -f /tmp/vmlinuz-{r} && "
                     f"if command -v kernel-install >/dev/null; then kernel-install add {r} /boot/vmlinuz-{r}; fi")
            systemd = "[ -d /run/systemd/system ] && command -v systemctl >/dev/null"
            if token:
                # The running command line without an earlier marker, plus this switch's marker.
                _root(c, f"initrd=$(ls /boot/initrd.img-{r} /boot/initramfs-{r}.img 2>/dev/null | head -n 1); "
                         r"cmdline=$(sed -e 's/ *pmufarm\.boot=[^ ]*//g' /proc/cmdline); "
                         f'kexec -l /boot/vmlinuz-{r} ${{initrd:+--initrd=$initrd}} '
                         f'--command-line="$cmdline pmufarm.boot={token}"')
                jump = f"if {systemd}; then systemctl kexec; else kexec -e; fi"
            else:
                jump = f"if {systemd}; then systemctl reboot; else reboot; fi"
            # Detached, after this SSH command returned: the connection must not hang on the old kernel.
            _root(c, f"setsid sh -c {shlex.quote('sleep 1; ' + jump)} </dev/null >/dev/null 2>&1 &", 30)
    except GateError:
        raise
    except Exception as exc:  # SSH/sudo/kexec failures are infrastructure, not the kernel's fault
        raise GateError(3, "inconclusive", f"host {host.name}: installing kernel {release} over SSH "
                                           f"failed: {_why(exc)}") from None
    return Boot(boot_id=boot_id, token=token)


def _why(exc: BaseException) -> str:
    result = getattr(exc, "result", None)  # invoke's UnexpectedExit carries the command's output
    if result is not None:
        return f"exit {result.exited}: {(result.stderr or result.stdout).strip()[-200:]}"
    return f"{type(exc).__name__}: {exc}"


def wait_for_return(host: Host, release: str, boot: Boot, timeout: float, ssh: SshOptions | None = None,
                    poll: float = 3.0) -> None:
    """Until ``timeout``: the host answers SSH from a new boot of ``release`` carrying the marker; then, with
    a farm broker, its agent reports ``release`` too. Else GateError(3) naming the host."""
    ssh = ssh or SshOptions(connect_timeout=10.0)
    deadline = time.monotonic() + timeout
    seen = "no answer"
    while True:
        try:
            with connect(host, ssh) as c:
                out = _root(c, "cat /proc/sys/kernel/random/boot_id; uname -r; cat /proc/cmdline", 30).splitlines()
            boot_id, running, cmdline = (out + ["", "", ""])[:3]
            seen = f"boot {boot_id[:8]}, kernel {running}"
            if boot_id and boot_id != boot.boot_id and running == release and \
                    (boot.token is None or f"pmufarm.boot={boot.token}" in cmdline.split()):
                break
            if boot.token and boot_id != boot.boot_id:
                seen += f", command line without pmufarm.boot={boot.token}"
        except Exception as exc:  # refused / reset / timed out while the host switches kernels
            seen = f"no answer over SSH ({type(exc).__name__})"
        if time.monotonic() + poll > deadline:
            raise GateError(3, "inconclusive", f"host {host.name}: did not come back on kernel {release} within "
                                               f"{timeout:g}s (last: {seen})")
        time.sleep(poll)
    if os.environ.get("FARM_BROKER_URL"):
        wait_for_agent(host, release, max(deadline - time.monotonic(), 60.0))


def wait_for_agent(host: Host, release: str, timeout: float) -> None:
    """Poll the host's agent (probe_facts on its queue) until it reports ``release``; else inconclusive."""
    from agent.celery_app import PROBE_FACTS, host_queue, make_app

    app = make_app(os.environ["FARM_BROKER_URL"])
    deadline = time.monotonic() + timeout
    seen = "no answer"
    while time.monotonic() < deadline:
        res = app.send_task(PROBE_FACTS, kwargs={"host": host.entry()}, queue=host_queue(host.name), expires=60)
        try:
            facts = res.get(timeout=60)
            seen = str((facts.get("kernel") or {}).get("release"))
            if seen == release:
                return
        except Exception as exc:  # agent not started yet on the new kernel
            seen = f"no answer ({type(exc).__name__})"
        finally:
            res.forget()
        time.sleep(10)
    raise GateError(3, "inconclusive", f"host {host.name}: its agent did not report kernel {release} within "
                                       f"{timeout:g}s after the host came back (last: {seen})")
