"""kexec provisioning, proven on a real machine: a QEMU (TCG) VM acting as a farm host.

The gate's own provisioning code (orchestrator/gate/provision.py ``provision``) installs a "built
kernel" on the VM over SSH (fabric, strict host keys) and kexecs into it: the same Debian kernel the
VM runs, from a build directory whose ``make kernelrelease`` / ``modules_install`` answer like a
kernel tree's. It must come back within the timeout given to the gate's wait-for-return on a new
boot (boot_id) of that release whose /proc/cmdline carries the gate's boot marker -- checked here
independently over SSH and on the VM's serial console. The VM is tests/farmhost_vm.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.gate.build import Build
from orchestrator.gate.common import GateError
from orchestrator.gate.provision import Boot, SshOptions, connect, provision, wait_for_return
from orchestrator.inventory import Host

PROVISION_TIMEOUT = 180.0  # the wait-for-return timeout handed to the gate's code (--provision-timeout)
BOOT_TIMEOUT = 180.0       # first boot of the VM under TCG (about 10 s on an idle 2-core machine)


def fake_build(tmp: Path, image: Path, release: str) -> Build:
    """A built "kernel tree": the Debian vmlinuz as bzImage, and the two make targets provisioning calls."""
    tree = tmp / "tree"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(image.read_bytes())
    (tree / "Makefile").write_text(
        f"kernelrelease:\n\t@echo {release}\n"
        f"modules_install:\n\tmkdir -p $(INSTALL_MOD_PATH)/lib/modules/{release}/kernel\n"
        f"\techo pmufarm-gate-test > $(INSTALL_MOD_PATH)/lib/modules/{release}/modules.pmufarm\n")
    return Build("candidate", tree, "0" * 40, "true", 0.0, tmp / "build.log", None)


def remote(host: Host, ssh: SshOptions, cmd: str) -> str:
    with connect(host, ssh) as c:
        return c.run(cmd, hide=True, in_stream=False, timeout=60).stdout


@pytest.mark.slow
def test_kexec_provisioning_on_a_qemu_farm_host(tmp_path: Path) -> None:
    from tests.farmhost_vm import FarmHostVM, Missing, build_image

    try:
        image = build_image(tmp_path)
    except Missing as exc:
        pytest.skip(f"farm host VM: {exc}")
    with FarmHostVM(image, tmp_path) as vm:
        vm.wait_up(BOOT_TIMEOUT)
        host = Host(name="qemu-farmhost", address="127.0.0.1", port=vm.port, user="root", provision="kexec")
        ssh = SshOptions(known_hosts=[vm.known_hosts], identities=[str(image.identity)])
        before = remote(host, ssh, "cat /proc/sys/kernel/random/boot_id").strip()
        # The host's initramfs for this release, where kernel-install would have left it on a distro host.
        with connect(host, ssh) as c:
            c.put(str(image.initrd), f"/boot/initrd.img-{image.release}")

        t0 = time.monotonic()
        prov = provision([host], fake_build(tmp_path, image.kernel, image.release), PROVISION_TIMEOUT,
                         echo=lambda m: None, ssh=ssh)
        took = time.monotonic() - t0

        token = prov.boots["qemu-farmhost"]["token"]
        assert prov.releases == {"qemu-farmhost": image.release}
        out = remote(host, ssh, "cat /proc/sys/kernel/random/boot_id; uname -r; cat /proc/cmdline").splitlines()
        boot_id, release, cmdline = out[:3]
        assert boot_id != before, "same boot: the kexec did not happen"
        assert release == image.release
        assert f"pmufarm.boot={token}" in cmdline.split(), cmdline
        assert "pmufarm.farmhost=first-boot" in cmdline.split()  # the running command line was kept
        assert vm.boots() == 2, vm.tail()
        assert f"pmufarm.boot={token}" in vm.tail(3)
        assert took < PROVISION_TIMEOUT


def test_host_that_does_not_come_back_is_inconclusive_naming_it() -> None:
    """Nothing listens on the host's SSH port: wait-for-return gives up with exit 3 and the host's name."""
    from tests.farmhost_vm import free_port

    host = Host(name="gone-host", address="127.0.0.1", port=free_port(), user="root", provision="kexec")
    with pytest.raises(GateError) as err:
        wait_for_return(host, "6.99.0", Boot(boot_id="x", token="abc"), timeout=2.0,
                        ssh=SshOptions(connect_timeout=1.0), poll=0.5)
    assert err.value.code == 3 and err.value.verdict == "inconclusive"
    assert "gone-host" in str(err.value) and "did not come back on kernel 6.99.0" in str(err.value)
    assert "no answer over SSH" in str(err.value)
