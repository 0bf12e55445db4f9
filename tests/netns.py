"""Farm hosts as network namespaces, each with its own sshd: a small real farm on one machine.

``NetnsLab(workdir, ["alpha", "beta"])`` creates a bridge in the root namespace (``10.231.<n>.1/24``,
the farm LAN; the broker listens there) and per host a namespace ``pmuf<tag>-<name>`` joined by a veth
pair, with ``10.231.<n>.<11+i>``, ``lo`` up and a default route via the bridge. ``start_sshd()`` runs
``/usr/sbin/sshd`` inside each namespace on its address, port 22, with a generated ed25519 host key;
``known_hosts()`` writes the matching file. One ed25519 user key logs in as root.

Namespaces share the filesystem with the host, so every "host" needs its own directories (deploy roots).
Only loopback and the namespaces created here ever see traffic. ``close()`` kills every process left in
the namespaces (by pid, from ``ip netns pids``), deletes the namespaces (their veth ends go with them)
and the bridge; it runs even if setup failed halfway.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SUBNET = "10.231"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}")
    return r


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for `ip netns` and sshd"
    if not shutil.which("ip"):
        return "`ip` (iproute2) not found"
    probe = f"pmufprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    r = _run("ip", "link", "add", f"pfbrp{os.getpid() % 10000}", "type", "bridge", check=False)
    if r.returncode != 0:
        return f"`ip link add type bridge` failed: {r.stderr.strip()}"
    _run("ip", "link", "del", f"pfbrp{os.getpid() % 10000}", check=False)
    return None


def sshd_unavailable() -> str | None:
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen not found (openssh-client)"
    return None


def keygen(path: Path) -> str:
    """A fresh ed25519 key pair at ``path`` (+ ``.pub``); returns the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path))
    return path.with_name(path.name + ".pub").read_text().strip()


def _used_subnets() -> set[int]:
    out = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    return {int(m) for m in re.findall(rf"inet {re.escape(SUBNET)}\.(\d+)\.", out)}


@dataclass
class NsHost:
    name: str
    ns: str
    veth: str
    address: str
    dir: Path
    host_key_pub: str = ""
    sshd: subprocess.Popen[bytes] | None = None


class NetnsLab:
    def __init__(self, workdir: Path, names: list[str]) -> None:
        self.dir = workdir
        self.tag = f"{os.getpid() % 100000}"
        self.bridge = f"pfbr{self.tag}"
        free = [n for n in range(200, 254) if n not in _used_subnets()]
        if not free:
            raise RuntimeError(f"no free {SUBNET}.x.0/24 subnet")
        self.net = f"{SUBNET}.{free[0]}"
        self.gateway = f"{self.net}.1"
        self.hosts = {n: NsHost(n, f"pmuf{self.tag}-{n}", f"pfv{self.tag}h{i}", f"{self.net}.{11 + i}",
                                workdir / n) for i, n in enumerate(names)}
        self.user_key = workdir / "id_ed25519"
        self._created_ns: list[str] = []
        self._bridge_created = False

    # ---------------------------------------------------------------- network
    def __enter__(self) -> NetnsLab:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> NetnsLab:
        self.dir.mkdir(parents=True, exist_ok=True)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge_created = True
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for h in self.hosts.values():
            _run("ip", "netns", "add", h.ns)
            self._created_ns.append(h.ns)
            _run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _run("ip", "link", "set", h.veth, "master", self.bridge, "up")
            _run("ip", "-n", h.ns, "link", "set", "lo", "up")
            _run("ip", "-n", h.ns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _run("ip", "-n", h.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", h.ns, "route", "add", "default", "via", self.gateway)
        return self

    def exec(self, name: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.hosts[name].ns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def pids(self, name: str) -> list[int]:
        out = _run("ip", "netns", "pids", self.hosts[name].ns, check=False).stdout
        return [int(p) for p in out.split()]

    # ---------------------------------------------------------------- sshd
    def start_sshd(self, timeout: float = 10) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        user_pub = keygen(self.user_key)
        auth = self.dir / "authorized_keys"
        auth.write_text(user_pub + "\n")
        auth.chmod(0o600)
        for h in self.hosts.values():
            h.dir.mkdir(parents=True, exist_ok=True)
            h.host_key_pub = keygen(h.dir / "ssh_host_ed25519_key")
            cfg = h.dir / "sshd_config"
            cfg.write_text("\n".join([
                "Port 22", f"ListenAddress {h.address}", f"HostKey {h.dir / 'ssh_host_ed25519_key'}",
                f"PidFile {h.dir / 'sshd.pid'}", f"AuthorizedKeysFile {auth}", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
                "Subsystem sftp internal-sftp", "LogLevel VERBOSE", "MaxStartups 50:30:100", ""]))
            check = _run(SSHD, "-t", "-f", str(cfg), check=False)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t: {check.stderr.strip()}")
            h.sshd = subprocess.Popen(["ip", "netns", "exec", h.ns, SSHD, "-D", "-f", str(cfg), "-E",
                                       str(h.dir / "sshd.log")], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for h in self.hosts.values():
            while True:
                try:
                    with socket.create_connection((h.address, 22), timeout=1) as s:
                        if s.recv(4).startswith(b"SSH-"):
                            break
                except OSError:
                    pass
                if h.sshd and h.sshd.poll() is not None:
                    raise RuntimeError(f"sshd for {h.name} exited: {(h.dir / 'sshd.log').read_text()[-500:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd for {h.name} not listening on {h.address}:22")
                time.sleep(0.05)

    def known_hosts(self, path: Path, names: list[str] | None = None, wrong: dict[str, str] | None = None) -> Path:
        """known_hosts for ``names`` (default all); ``wrong`` maps a host to a different key line to list."""
        lines = []
        for h in self.hosts.values():
            if names is not None and h.name not in names:
                continue
            key = (wrong or {}).get(h.name, h.host_key_pub)
            keytype, b64 = key.split()[:2]
            lines.append(f"{h.address} {keytype} {b64}")
        path.write_text("\n".join(lines) + "\n")
        return path

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        for h in self.hosts.values():
            if h.ns not in self._created_ns:
                continue
            # Everything still running in the namespace was started by this lab (sshd, deployed workers).
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = [p for p in self.pids(h.name) if p != os.getpid()]
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, sig)
                end = time.monotonic() + 3
                while pids and time.monotonic() < end and self.pids(h.name):
                    time.sleep(0.05)
            if h.sshd is not None:
                try:
                    h.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    h.sshd.kill()
            _run("ip", "netns", "del", h.ns, check=False)
            self._created_ns.remove(h.ns)
        if self._bridge_created:
            _run("ip", "link", "del", self.bridge, check=False)
            self._bridge_created = False
