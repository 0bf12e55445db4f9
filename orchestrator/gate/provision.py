"""Put the kernel under test on every selected host, per the inventory entry's ``provision``.

``none``
    The host already runs the kernel under test; nothing is done. For a real (kvm) host that means
    the baseline and the candidate run on whatever kernel it booted, so the gate notes it in gate.md
    when both report the same ``uname -r``: only the farm's operator knows that such a comparison
    is meaningful (e.g. the baseline was stored from an earlier boot).

``kexec`` / ``reboot`` (real hosts, over fabric/SSH; not exercised by the test suite)
    ``make -s kernelrelease`` names the release R; ``make modules_install INSTALL_MOD_PATH=stage``
    stages the modules; ``arch/x86/boot/bzImage`` and a tarball of ``lib/modules/R`` are copied to
    the host, unpacked into ``/lib/modules/R``, installed as ``/boot/vmlinuz-R`` and registered with
    ``kernel-install add R /boot/vmlinuz-R`` (the host's initramfs/bootloader hooks run there).
    ``kexec`` then does ``kexec -l /boot/vmlinuz-R --initrd=... --reuse-cmdline && systemctl kexec``;
    ``reboot`` does ``systemctl reboot`` (kernel-install makes R the default entry on BLS systems).
    The gate then asks the host's agent for its facts (the ``probe_facts`` task on its own queue,
    through FARM_BROKER_URL) until it reports ``kernel.release == R``. A host that does not come back
    on R within ``--provision-timeout`` makes the gate ``inconclusive`` (exit 3): an infrastructure
    failure, never a kernel regression. A ``local`` host is never kexec'd or rebooted by the gate.

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
    notes: list[str] = field(default_factory=list)


def provision(hosts: list[Host], build: Build, timeout: float, echo: Any = print) -> Provisioned:
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
        install_kernel(h, build, release)
        wait_for_release(h, release, timeout)
        out.releases[h.name] = release
    return out


def kernel_release(build: Build) -> str:
    proc = subprocess.run(["make", "-s", "kernelrelease"], cwd=build.worktree, capture_output=True, text=True)
    release = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not release:
        raise GateError(2, "build-failed", f"{build.role}: 'make -s kernelrelease' gave no release in "
                                           f"{build.worktree}: {proc.stderr.strip()[:200]}")
    return release


def install_kernel(host: Host, build: Build, release: str) -> None:
    """Copy bzImage + modules to the host and arm the switch (kexec or reboot); see the module docstring."""
    from fabric import Connection

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
        r = shlex.quote(release)
        try:
            with Connection(host.address, user=host.user, port=host.port, connect_timeout=30) as c:
                c.put(str(image), f"/tmp/vmlinuz-{release}")
                c.put(str(tarball), f"/tmp/modules-{release}.tar.gz")
                c.sudo(f"sh -c 'tar -C / -xzf /tmp/modules-{r}.tar.gz && install -m 0644 /tmp/vmlinuz-{r} "
                       f"/boot/vmlinuz-{r} && kernel-install add {r} /boot/vmlinuz-{r}'", hide=True)
                if host.provision == "kexec":
                    initrd = f"$(ls /boot/initrd.img-{r} /boot/initramfs-{r}.img 2>/dev/null | head -1)"
                    c.sudo(f"sh -c 'kexec -l /boot/vmlinuz-{r} --initrd={initrd} --reuse-cmdline'", hide=True)
                    c.sudo("sh -c 'nohup systemctl kexec >/dev/null 2>&1 &'", hide=True, warn=True)
                else:
                    c.sudo("sh -c 'nohup systemctl reboot >/dev/null 2>&1 &'", hide=True, warn=True)
        except GateError:
            raise
        except Exception as exc:  # SSH/sudo failures are infrastructure, not the kernel's fault
            raise GateError(3, "inconclusive", f"host {host.name}: installing kernel {release} over SSH "
                                               f"failed: {exc}") from None


def wait_for_release(host: Host, release: str, timeout: float) -> None:
    """Poll the host's agent (probe_facts on its queue) until it reports ``release``; else inconclusive."""
    import os

    from agent.celery_app import PROBE_FACTS, host_queue, make_app

    broker = os.environ.get("FARM_BROKER_URL")
    if not broker:
        raise GateError(2, "input-error", f"host {host.name}: provision {host.provision} needs the farm broker "
                                          "(FARM_BROKER_URL) to see its agent come back")
    app = make_app(broker)
    deadline = time.monotonic() + timeout
    seen = "no answer"
    time.sleep(min(30.0, timeout / 10))  # let the old kernel go down first
    while time.monotonic() < deadline:
        res = app.send_task(PROBE_FACTS, kwargs={"host": host.entry()}, queue=host_queue(host.name), expires=60)
        try:
            facts = res.get(timeout=60)
            seen = str((facts.get("kernel") or {}).get("release"))
            if seen == release:
                return
        except Exception as exc:  # agent down while the host reboots
            seen = f"no answer ({type(exc).__name__})"
        finally:
            res.forget()
        time.sleep(10)
    raise GateError(3, "inconclusive", f"host {host.name}: agent did not come back on kernel {release} within "
                                       f"{timeout:g}s (last: {seen})")
