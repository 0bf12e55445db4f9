"""A QEMU (TCG) virtual machine acting as a farm host, for proving kexec provisioning for real.

The VM boots Debian's kernel (the one ``make setup`` puts in ``~/.cache/pmufarm/kernel``, found
with agent.guestimage's functions) with an initramfs made here from Debian's own binaries: static
busybox, dropbear (sshd, with the openssh sftp-server that fabric's ``put`` needs), kexec-tools,
and the e1000 NIC module taken from the same kernel package. It listens for SSH on 127.0.0.1 only
(QEMU user-mode networking, ``hostfwd``), with a host key made here and written to a known_hosts
file, so the gate connects with strict host-key checking exactly as it does to a real host.

The initramfs keeps nothing across a kexec (it is unpacked into RAM each boot); the host key is in
the image, so the host comes back with the same key. Missing pieces are a ``Missing`` naming the
Debian package (the test skips with that line).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent import guestimage

APT_PACKAGES = ("dropbear-bin", "kexec-tools", "cpio", "busybox-static", "qemu-system-x86", "openssh-sftp-server")
NIC_MODULE = "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/run /boot
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
insmod /lib/modules/e1000.ko
ip link set lo up && ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -s -E 2>/tmp/dropbear.log
echo "FARMHOST-UP $(uname -r) $(cat /proc/cmdline)" > /dev/ttyS0
while :; do sleep 3600; done
"""


class Missing(Exception):
    """A tool or file the VM needs is absent; the message names it (and its Debian package)."""


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.path.exists(p)), None)
    if not path:
        raise Missing(f"{tool} not found (Debian package {package})")
    return path


def debian_kernel() -> tuple[Path, str]:
    """The cached Debian vmlinuz and its release (``vmlinuz-<release>``)."""
    hits = sorted((guestimage.cache_dir() / "kernel" / "boot").glob("vmlinuz-*"))
    if not hits:
        raise Missing(f"no Debian kernel in {guestimage.cache_dir() / 'kernel' / 'boot'} "
                      "(make setup, or python -m agent.guestimage fetch-kernel)")
    return hits[-1], hits[-1].name.removeprefix("vmlinuz-")


def nic_module(release: str) -> Path:
    """e1000.ko of ``release``, from Debian's linux-image-<release> package (downloaded once, cached)."""
    cached = guestimage.cache_dir() / "farmhost" / release / "e1000.ko"
    if cached.exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.parent / "download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            deb = guestimage.apt_download(f"linux-image-{release}", tmp, missing="kernel")
        except guestimage.GuestImageError as exc:
            raise Missing(f"linux-image-{release} (for its e1000 module): {exc}") from None
        member = f"./lib/modules/{release}/{NIC_MODULE}"
        with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as p:
            subprocess.run(["tar", "-x", "-C", str(tmp), member], stdin=p.stdout, check=False, capture_output=True)
        found = tmp / member
        if not found.exists():
            raise Missing(f"{deb.name} has no {member}")
        shutil.copy2(found, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return sorted({m for m in re.findall(r"(/\S+\.so[^\s]*)", out)})


@dataclass
class FarmHostImage:
    kernel: Path
    release: str
    initrd: Path
    identity: Path      # the gate's private key (root's authorized key in the VM)
    host_key_line: str  # "ssh-ed25519 AAAA..." of the VM


def build_image(workdir: Path) -> FarmHostImage:
    """Kernel + an initramfs with sshd and kexec-tools; raises Missing naming what is absent."""
    kernel, release = debian_kernel()
    tools = {"dropbear": _need("dropbear", "dropbear-bin"), "dropbearkey": _need("dropbearkey", "dropbear-bin"),
             "kexec": _need("kexec", "kexec-tools"), "cpio": _need("cpio", "cpio"),
             "ssh-keygen": _need("ssh-keygen", "openssh-client"), "qemu": str(guestimage.find_qemu())}
    sftp = Path("/usr/lib/openssh/sftp-server")
    if not sftp.exists():
        raise Missing(f"{sftp} not found (Debian package openssh-sftp-server)")
    try:
        busybox = guestimage.find_busybox()
    except guestimage.GuestImageError as exc:
        raise Missing(str(exc)) from None
    module = nic_module(release)

    root = workdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "sbin", "usr/sbin", "usr/lib", "etc/dropbear", "root/.ssh", "lib/modules", "lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    shutil.copy2(tools["dropbear"], root / "usr/sbin/dropbear")
    shutil.copy2(tools["kexec"], root / "sbin/kexec")
    shutil.copy2(sftp, root / "usr/lib/sftp-server")  # where Debian's dropbear looks for it
    for lib in {x for b in (tools["dropbear"], tools["kexec"], str(sftp)) for x in _libs(b)}:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest)
    shutil.copy2(module, root / "lib/modules/e1000.ko")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shells").write_text("/bin/sh\n")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)

    hostkey = root / "etc/dropbear/dropbear_ed25519_host_key"
    out = subprocess.run([tools["dropbearkey"], "-t", "ed25519", "-f", str(hostkey)], capture_output=True,
                         text=True, check=True).stdout
    host_key_line = next(ln for ln in out.splitlines() if ln.startswith("ssh-ed25519 "))
    host_key_line = " ".join(host_key_line.split()[:2])
    identity = workdir / "id_ed25519"
    identity.unlink(missing_ok=True)
    subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(identity)], check=True)
    (root / "root/.ssh/authorized_keys").write_text(identity.with_suffix(".pub").read_text())
    (root / "root").chmod(0o700)
    (root / "root/.ssh").chmod(0o700)
    (root / "root/.ssh/authorized_keys").chmod(0o600)

    files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
    archive = subprocess.run([tools["cpio"], "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, input=files,
                             capture_output=True, check=True).stdout
    initrd = workdir / "farmhost.cpio.gz"
    initrd.write_bytes(gzip.compress(archive, compresslevel=6))
    return FarmHostImage(kernel, release, initrd, identity, host_key_line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FarmHostVM:
    """``qemu-system-x86_64 -accel tcg`` with SSH forwarded to 127.0.0.1:<port>; console in ``console.log``."""

    def __init__(self, image: FarmHostImage, workdir: Path, memory_mb: int = 768) -> None:
        self.image, self.workdir, self.memory_mb = image, workdir, memory_mb
        self.port = free_port()
        self.console = workdir / "console.log"
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {image.host_key_line}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [str(guestimage.find_qemu()), "-accel", "tcg", "-m", str(self.memory_mb), "-smp", "1",
               "-display", "none", "-no-reboot", "-serial", f"file:{self.console}", "-monitor", "none",
               "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
               "-append", "console=ttyS0 quiet panic=-1 pmufarm.farmhost=first-boot",
               "-nic", f"user,model=e1000,hostfwd=tcp:127.0.0.1:{self.port}-:22"]
        with open(self.workdir / "qemu.stderr", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)

    def boots(self) -> int:
        """How many times the init script reported the host up on the console."""
        try:
            return self.console.read_text(errors="replace").count("FARMHOST-UP ")
        except OSError:
            return 0

    def wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.boots() == 0:
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"farm host VM did not come up in {timeout:g}s; console:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console output)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> FarmHostVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
