"""``orchestrator deploy``: install and start agent workers on farm hosts over SSH (Fabric 3).

Per host, in parallel (a thread pool; one host's failure never stops the others):
1. connect with strict host-key checking (``--known-hosts``; unknown or changed key -> that host fails);
2. probe: hostname, the host's Python, init system (systemd if ``/run/systemd/system`` exists), the
   deployed revision and the worker's state;
3. unless the revision is already installed (and no ``--force``): ship the offline wheelhouse (only the
   wheels the host lacks) and ``git archive`` of the revision, create ``releases/<rev>/venv``,
   ``pip install --no-index --find-links <root>/wheelhouse -e releases/<rev>/tree`` (no network needed),
   ``make -C agent/native`` when the revision has a Makefile there (a failed build fails the host);
4. write ``<root>/etc/agent.env`` (0600: the broker URL with its password, PMUFARM_TREE/REVISION);
5. install the service: a systemd unit where systemd runs, else ``pmufarm-supervise`` started with
   setsid (pidfiles, restart on exit, flock against duplicates); (re)start only when something changed
   or the worker is not running;
6. verify: exactly one worker answers a Celery ping as ``<name>@<hostname>`` and consumes
   ``host.<name>``.

Layout under the host's deploy root (inventory label ``deploy_root``, else ``--root``, default
/opt/pmufarm): ``wheelhouse/``, ``releases/<rev>/{tree,venv,deploy.json,.complete}``, ``current`` ->
``releases/<rev>``, ``etc/agent.env``, ``bin/``, ``run/``, ``log/``, ``state/``. The three newest
releases are kept. ``<tree>/REVISION`` holds the revision the agent reports.

Exit status: 0 every host ok (or skipped: ``address: local``), 3 any host failed, 2 bad input.
Secrets never reach the output: every line goes through :class:`orchestrator.broker.Masker`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from orchestrator.broker import Masker, is_tls, url_query, with_query
from orchestrator.deploy_source import (
    INTERP_PROBE,
    Interp,
    Revision,
    SourceError,
    requirements,
    resolve_revision,
    wheel_files,
    wheelhouse,
)
from orchestrator.inventory import Host, InventoryError, load_inventory, select_hosts

EXIT_OK, EXIT_INPUT, EXIT_HOSTS_FAILED = 0, 2, 3
DEFAULT_ROOT = "/opt/pmufarm"
KEEP_RELEASES = 3
DEPLOY_FILES = Path(__file__).resolve().parent.parent / "deploy"
STOP_WAIT_S = 30


class HostError(RuntimeError):
    """One line: why this host failed."""


@dataclass
class DeployOptions:
    revision: Revision
    broker_url: str
    known_hosts: list[Path]
    identities: list[str]
    state_dir: Path
    default_root: str = DEFAULT_ROOT
    user: str | None = None
    force: bool = False
    restart: bool = False
    connect_timeout: float = 10.0
    ping_timeout: float = 90.0
    install_timeout: int = 900
    service: str = "auto"  # auto | systemd | supervisor
    signing_dir: Path | None = None
    masker: Masker = field(default_factory=Masker)
    echo: Callable[[str], None] = print
    archive: bytes | None = None
    reqs: list[str] = field(default_factory=list)
    agent_urls: dict[str, str] = field(default_factory=dict)  # host -> its own restricted broker user's URL


@dataclass
class HostResult:
    name: str
    status: str  # ok | error | skipped
    action: str = "-"
    revision: str = "-"
    worker: str = "-"
    detail: str = ""


def _one_line(text: str, limit: int = 300) -> str:
    line = " | ".join(s.strip() for s in str(text).strip().splitlines() if s.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _q(s: str | Path) -> str:
    return shlex.quote(str(s))


def render_unit(root: str, host: str) -> str:
    """The systemd unit of ``host``'s worker (deploy/pmufarm-agent.service.in)."""
    text = (DEPLOY_FILES / "pmufarm-agent.service.in").read_text()
    return text.replace("@ROOT@", root).replace("@HOST@", host)


class _Wheelhouses:
    """One wheelhouse build per interpreter tag, even with many host threads asking at once."""

    def __init__(self, opts: DeployOptions) -> None:
        self.opts, self.lock, self.cache = opts, threading.Lock(), {}

    def get(self, target: Interp) -> Path:
        with self.lock:
            if target.tag not in self.cache:
                self.cache[target.tag] = wheelhouse(self.opts.state_dir, self.opts.reqs, target, log=self.opts.echo)
            return self.cache[target.tag]


class HostDeploy:
    def __init__(self, host: Host, opts: DeployOptions, houses: _Wheelhouses) -> None:
        self.host, self.opts, self.houses = host, opts, houses
        self.root = host.labels.get("deploy_root") or opts.default_root
        self.python = host.labels.get("python") or "python3"
        self.rev = opts.revision.name
        self.release = f"{self.root}/releases/{self.rev}"
        self.conn: Any = None
        self.facts: dict[str, str] = {}

    # ------------------------------------------------------------ plumbing
    def say(self, msg: str) -> None:
        self.opts.echo(f"[{self.host.name}] {msg}")

    def connect(self) -> None:
        import paramiko
        from fabric import Connection

        ids = self.opts.identities
        kw: dict[str, Any] = {"banner_timeout": self.opts.connect_timeout, "auth_timeout": self.opts.connect_timeout}
        if ids:
            kw |= {"key_filename": ids, "look_for_keys": False, "allow_agent": False}
        c = Connection(self.host.address, user=self.host.user or self.opts.user, port=self.host.port or 22,
                       connect_timeout=self.opts.connect_timeout, connect_kwargs=kw)
        # Fabric installs AutoAddPolicy and loads no known_hosts (fabric#2071): undo both before open().
        for kh in self.opts.known_hosts:
            c.client.load_host_keys(str(kh))
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        target = f"{c.user}@{self.host.address}:{c.port}"
        try:
            c.open()
        except paramiko.BadHostKeyException as exc:
            raise HostError(f"HOST KEY MISMATCH for {target}: known_hosts has {exc.expected_key.get_name()} "
                            f"{exc.expected_key.get_base64()[-12:]}..., server offered "
                            f"{exc.key.get_base64()[-12:]}... (refusing; possible impersonation)") from None
        except paramiko.AuthenticationException as exc:
            raise HostError(f"ssh authentication failed for {target}: {exc}") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostError(f"unknown host key: {target} is not in "
                                f"{', '.join(map(str, self.opts.known_hosts))} (refusing; verify the "
                                f"fingerprint and add it)") from None
            raise HostError(f"ssh to {target}: {exc}") from None
        except TimeoutError:
            raise HostError(f"ssh to {target}: connection timed out after {self.opts.connect_timeout:g}s") from None
        except OSError as exc:  # NoValidConnectionsError, refused, unreachable
            raise HostError(f"ssh to {target}: {exc.strerror or exc}") from None
        self.conn = c

    def sh(self, script: str, timeout: int = 120, what: str = "remote command") -> str:
        """Run ``script`` under ``sh -eu`` with a remote ``timeout`` (kills it if the channel hangs)."""
        cmd = f"timeout -k 10 {int(timeout)} sh -euc {_q(script)}"
        try:
            r = self.conn.run(cmd, hide=True, warn=True, in_stream=False, timeout=timeout + 30)
        except Exception as exc:  # CommandTimedOut, SSH errors
            raise HostError(f"{what}: {type(exc).__name__}: {_one_line(str(exc))}") from None
        if r.exited != 0:
            why = "timed out" if r.exited == 124 else f"exit {r.exited}"
            raise HostError(f"{what} failed ({why}): {_one_line(r.stderr or r.stdout)}")
        return r.stdout

    def put_bytes(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        """Atomic write through SFTP: the mode is set before any content is written."""
        sftp = self.conn.sftp()
        tmp = f"{remote}.part-{os.getpid()}-{threading.get_ident()}"
        with sftp.open(tmp, "wb") as fh:
            fh.chmod(mode)
            fh.set_pipelined(True)
            fh.write(data)
        sftp.posix_rename(tmp, remote)

    # ------------------------------------------------------------ steps
    def probe(self) -> None:
        r, rel = _q(self.root), _q(self.release)
        out = self.sh(f"""
echo "hostname=$(uname -n)"
echo "python=$({_q(self.python)} -c {_q(INTERP_PROBE)} 2>&1 | tail -n 1)"
if [ -d /run/systemd/system ]; then echo init=systemd; else echo init=other; fi
if [ -f {r}/current/tree/REVISION ]; then echo "current=$(cat {r}/current/tree/REVISION)"; fi
if [ -f {rel}/.complete ]; then echo complete=1; fi
if [ -f {rel}/NATIVE ]; then echo "native_state=$(cat {rel}/NATIVE)"; fi
if [ -f {r}/etc/agent.env ]; then echo "env_sha=$(sha256sum {r}/etc/agent.env | cut -d' ' -f1)"; fi
if command -v make >/dev/null 2>&1; then echo make=1; fi
if command -v setsid >/dev/null 2>&1; then echo setsid=1; fi
{self._running_script()}
""", 30, "probe")
        self.facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _running_script(self) -> str:
        r = _q(self.root)
        return f"""
sp=$(cat {r}/run/supervisor.pid 2>/dev/null || true)
if {self._is_supervisor("$sp")}; then
  echo "supervisor=$sp"
  wp=$(cat {r}/run/worker.pid 2>/dev/null || true)
  if [ -n "$wp" ] && kill -0 "$wp" 2>/dev/null; then echo "worker=$wp"; fi
fi
if [ -d /run/systemd/system ] && systemctl is-active --quiet {_q(self.unit)} 2>/dev/null; then
  echo "systemd_pid=$(systemctl show -p MainPID --value {_q(self.unit)})"
fi
"""

    def _is_supervisor(self, pid: str) -> str:
        """Shell test: is ``pid`` this root's pmufarm-supervise (not a recycled pid)?"""
        return (f'[ -n "{pid}" ] && [ -r /proc/{pid}/cmdline ] && '
                f"tr '\\0' ' ' </proc/{pid}/cmdline | grep -qF {_q(f'pmufarm-supervise {self.root} ')}")

    @property
    def unit(self) -> str:
        return f"pmufarm-agent-{self.host.name}.service"

    @property
    def use_systemd(self) -> bool:
        if self.opts.service == "auto":
            return self.facts.get("init") == "systemd"
        return self.opts.service == "systemd"

    def interp(self) -> Interp:
        line = self.facts.get("python", "")
        try:
            target = Interp.parse(line)
        except SourceError:
            raise HostError(f"{self.python} on the host does not run: {_one_line(line) or 'no output'} (set the "
                            f"inventory label 'python' to a Python >= 3.11)") from None
        if tuple(int(x) for x in target.version.split(".")) < (3, 11):
            raise HostError(f"{self.python} on the host is Python {target.version}; pmufarm needs >= 3.11")
        return target

    def ship_wheelhouse(self, house: Path) -> int:
        remote_dir = f"{self.root}/wheelhouse"
        self.sh(f"mkdir -p {_q(remote_dir)}", 30, "mkdir wheelhouse")
        sftp = self.conn.sftp()
        have = {a.filename: a.st_size for a in sftp.listdir_attr(remote_dir)}
        missing = [(n, s) for n, s in wheel_files(house).items() if have.get(n) != s]
        for name, _ in missing:
            self.put_bytes((house / name).read_bytes(), f"{remote_dir}/{name}")
        return len(missing)

    def install(self, house: Path) -> str:
        rel, wh = _q(self.release), _q(f"{self.root}/wheelhouse")
        if self.facts.get("current") == self.rev:
            # --force on the running release: stop its worker before its venv goes away.
            self.stop_worker()
        self.sh(f"rm -rf {rel} && mkdir -p {rel}/tree", 120, "prepare release dir")
        assert self.opts.archive is not None
        self.put_bytes(self.opts.archive, f"{self.release}/src.tar.gz")
        self.say("creating venv, installing from the wheelhouse (offline)")
        self.sh(f"""
tar -xzf {rel}/src.tar.gz -C {rel}/tree
printf '%s\\n' {_q(self.rev)} > {rel}/tree/REVISION
{_q(self.python)} -m venv {rel}/venv
if ! PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \\
  {rel}/venv/bin/python -m pip install -q --no-cache-dir --no-index --find-links {wh} -e {rel}/tree \\
  > {rel}/pip-install.log 2>&1; then
  grep -v '^ *$' {rel}/pip-install.log | tail -n 4 >&2; exit 1
fi
{rel}/venv/bin/python -c 'import agent.tasks, celery'
""", self.opts.install_timeout, "venv install")
        native = "native: none in this revision"
        if self.opts.revision.has("agent/native/Makefile"):
            if not self.facts.get("make"):
                raise HostError("native harness: agent/native/Makefile needs make, which the host lacks")
            self.say("building agent/native")
            self.sh(f"make --no-print-directory -C {rel}/tree/agent/native > {rel}/native-build.log 2>&1 || "
                    f"{{ grep -v '^make.*: Leaving' {rel}/native-build.log | tail -n 3 >&2; exit 1; }}",
                    self.opts.install_timeout,
                    f"native harness build (make -C agent/native; log {self.release}/native-build.log)")
            native = "native: built"
        meta = {"revision": self.rev, "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "by": f"{os.environ.get('USER', 'unknown')}@{socket.gethostname()}", "python": self.facts["python"],
                "native": native}
        self.put_bytes(json.dumps(meta, indent=1).encode(), f"{self.release}/deploy.json")
        self.put_bytes(f"{native}\n".encode(), f"{self.release}/NATIVE")
        self.sh(f"rm -f {rel}/src.tar.gz && touch {rel}/.complete", 30, "finish release")
        return native

    def env_file(self) -> str:
        url = self.opts.agent_urls.get(self.host.name, self.opts.broker_url)
        if is_tls(url) and url_query(url).get("ssl_ca_certs"):
            url = with_query(url, ssl_ca_certs=f"{self.root}/etc/broker-ca.pem")
        env = {
            "FARM_BROKER_URL": url,
            "PMUFARM_HOST": self.host.name,
            "PMUFARM_ROOT": self.root,
            "PMUFARM_RELEASE": self.release,
            "PMUFARM_TREE": f"{self.release}/tree",
            "PMUFARM_REVISION": self.rev,
            "FARM_AGENT_STATE_DIR": f"{self.root}/state",
            "PYTHONUNBUFFERED": "1",
        }
        if self.opts.signing_dir:
            env |= {"FARM_SECURITY_KEY": f"{self.root}/etc/signing/agent.key",
                    "FARM_SECURITY_CERTIFICATE": f"{self.root}/etc/signing/agent.pem",
                    "FARM_SECURITY_CERT_STORE": f"{self.root}/etc/signing/certs"}
        lines = ["# Written by `orchestrator deploy`; holds the broker password (mode 0600). Do not edit."]
        for k, v in env.items():
            if "'" in v or "\n" in v:
                raise HostError(f"{k} contains a quote or newline; refusing to write the env file")
            lines.append(f"{k}='{v}'")
        return "\n".join(lines) + "\n"

    def write_config(self, env: str) -> bool:
        """Env file, CA/signing material, bin scripts; True if the env file changed."""
        r = _q(self.root)
        self.sh(f"umask 077; mkdir -p {r}/etc {r}/bin {r}/run {r}/log {r}/state && chmod 700 {r}/etc", 30,
                "create directories")
        changed = hashlib.sha256(env.encode()).hexdigest() != self.facts.get("env_sha")
        if changed:
            self.put_bytes(env.encode(), f"{self.root}/etc/agent.env", 0o600)
        url = self.opts.broker_url
        if is_tls(url) and url_query(url).get("ssl_ca_certs"):
            self.put_bytes(Path(url_query(url)["ssl_ca_certs"]).read_bytes(), f"{self.root}/etc/broker-ca.pem")
        if self.opts.signing_dir:
            sd = self.opts.signing_dir
            self.sh(f"umask 077; mkdir -p {r}/etc/signing/certs", 30, "signing dir")
            self.put_bytes((sd / "agent.key").read_bytes(), f"{self.root}/etc/signing/agent.key", 0o600)
            self.put_bytes((sd / "agent.pem").read_bytes(), f"{self.root}/etc/signing/agent.pem")
            for cert in sorted((sd / "certs").glob("*.pem")):
                self.put_bytes(cert.read_bytes(), f"{self.root}/etc/signing/certs/{cert.name}")
        for script in ("pmufarm-worker", "pmufarm-supervise"):
            self.put_bytes((DEPLOY_FILES / f"{script}.sh").read_bytes(), f"{self.root}/bin/{script}", 0o755)
        return changed

    def stop_worker(self) -> None:
        r = _q(self.root)
        systemd = ""
        if self.facts.get("init") == "systemd":
            systemd = f"systemctl stop {_q(self.unit)} 2>/dev/null || true"
        self.sh(f"""
{systemd}
sp=$(cat {r}/run/supervisor.pid 2>/dev/null || true)
if {self._is_supervisor("$sp")}; then
  kill -TERM "$sp" 2>/dev/null || true
  i=0
  while kill -0 "$sp" 2>/dev/null && [ $i -lt {STOP_WAIT_S * 10} ]; do sleep 0.1; i=$((i+1)); done
  # The supervisor's session/process group: a worker it left behind goes too.
  kill -KILL -- "-$sp" 2>/dev/null || true
fi
rm -f {r}/run/supervisor.pid {r}/run/worker.pid
if command -v flock >/dev/null 2>&1 && [ -e {r}/run/supervisor.lock ]; then
  i=0
  until flock -n {r}/run/supervisor.lock true; do
    i=$((i+1)); if [ $i -gt 50 ]; then echo "a process still holds {self.root}/run/supervisor.lock" >&2; exit 1; fi
    sleep 0.1
  done
fi
""", STOP_WAIT_S + 30, "stop worker")

    def start_worker(self) -> None:
        r, h = _q(self.root), _q(self.host.name)
        if self.use_systemd:
            self.put_bytes(render_unit(self.root, self.host.name).encode(), f"/etc/systemd/system/{self.unit}")
            self.stop_worker()  # also a supervisor left from a deploy without systemd
            self.sh(f"systemctl daemon-reload && systemctl enable --quiet {_q(self.unit)} && "
                    f"systemctl restart {_q(self.unit)}", 90, "systemctl restart")
            return
        if not self.facts.get("setsid"):
            raise HostError("setsid (util-linux) is missing on the host; cannot start the supervisor")
        self.stop_worker()
        self.sh(f"""
setsid -f /bin/sh {r}/bin/pmufarm-supervise {r} {h} </dev/null >>{r}/log/supervisor.log 2>&1
i=0
while [ $i -lt 100 ]; do
  [ -s {r}/run/worker.pid ] && [ -s {r}/run/supervisor.pid ] && exit 0
  i=$((i+1)); sleep 0.1
done
echo "supervisor did not start: $(tail -n 3 {r}/log/supervisor.log)" >&2
exit 1
""", 60, "start supervisor")

    def switch_current(self) -> None:
        r = _q(self.root)
        self.sh(f"""
ln -sfn releases/{_q(self.rev)} {r}/current.new && mv -Tf {r}/current.new {r}/current
cd {r}/releases
ls -1t | grep -vxF {_q(self.rev)} | tail -n +{KEEP_RELEASES} | while read -r old; do rm -rf "./$old"; done
""", 120, "switch release")

    def worker_log_tail(self) -> str:
        try:
            return self.sh(f"tail -n 8 {_q(self.root)}/log/worker.log 2>/dev/null || true", 20, "log tail")
        except HostError:
            return ""

    def verify(self, node: str) -> str:
        from agent.celery_app import host_queue, make_app

        app = make_app(self.opts.broker_url)
        app.conf.broker_connection_retry_on_startup = False
        signing = self.opts.signing_dir
        if signing and (signing / "orchestrator.key").exists():
            from orchestrator.broker import SigningFiles, enable_signing

            enable_signing(app, SigningFiles(signing / "orchestrator.key", signing / "orchestrator.pem",
                                             signing / "certs"))
        deadline = time.monotonic() + self.opts.ping_timeout
        replies: list[dict[str, Any]] = []
        last_err = ""
        try:
            while time.monotonic() < deadline:
                try:
                    replies = app.control.ping(destination=[node], timeout=1.0) or []
                except Exception as exc:  # broker refused us, unreachable...
                    last_err = _one_line(f"{type(exc).__name__}: {exc}")
                    time.sleep(1)
                    continue
                if replies:
                    break
            if not replies:
                tail = self.opts.masker(_one_line(self.worker_log_tail(), 400))
                why = f"; orchestrator broker error: {last_err}" if last_err else ""
                raise HostError(f"worker {node} did not answer ping within {self.opts.ping_timeout:g}s{why}; "
                                f"worker.log: {tail or '(empty)'}")
            # Let late duplicates answer too: every worker with this node name replies to the broadcast.
            more = app.control.ping(destination=[node], timeout=1.5) or []
            count = max(len(replies), len(more))
            if count > 1:
                raise HostError(f"{count} workers answer as {node}: a duplicate is running (stop it by hand)")
            queues = app.control.inspect(destination=[node], timeout=3).active_queues() or {}
            names = [q.get("name") for q in queues.get(node, [])]
            if host_queue(self.host.name) not in names:
                raise HostError(f"worker {node} answers ping but does not consume {host_queue(self.host.name)} "
                                f"(queues: {', '.join(map(str, names)) or 'unknown'})")
        finally:
            app.close()
        return node

    # ------------------------------------------------------------ the whole host
    def run(self) -> HostResult:
        res = HostResult(self.host.name, "error")
        try:
            if not re.fullmatch(r"/[A-Za-z0-9._/+-]*", self.root) or "/../" in f"{self.root}/":
                raise HostError(f"deploy root {self.root!r} must be an absolute path of [A-Za-z0-9._/+-]")
            self.say(f"connecting to {self.host.address}")
            self.connect()
            self.probe()
            target = self.interp()
            installed = self.facts.get("complete") == "1" and not self.opts.force
            if installed:
                res.action = "unchanged"
                native = self.facts.get("native_state", "")
            else:
                house = self.houses.get(target)
                n = self.ship_wheelhouse(house)
                self.say(f"shipped {n} wheel(s) and revision {self.rev}")
                native = self.install(house)
                res.action = "installed"
            changed = self.write_config(self.env_file())
            switching = self.facts.get("current") != self.rev
            if switching:
                self.switch_current()
            running = bool(self.facts.get("systemd_pid" if self.use_systemd else "worker"))
            needs_start = not installed or changed or switching or not running or self.opts.restart
            if needs_start:
                self.say("(re)starting worker" if running else "starting worker")
                self.start_worker()
                res.action += ", worker restarted" if running else ", worker started"
            node = f"{self.host.name}@{self.facts['hostname']}"
            try:
                self.verify(node)
            except HostError:
                if needs_start:
                    raise
                self.say("worker not answering; restarting it once")
                self.start_worker()
                res.action += ", worker restarted (was not answering)"
                self.verify(node)
            self.probe()
            if self.facts.get("current") != self.rev:
                raise HostError(f"{self.root}/current/tree/REVISION says {self.facts.get('current')!r}, "
                                f"expected {self.rev}")
            pid = self.facts.get("systemd_pid") or self.facts.get("worker") or "?"
            mode = "systemd" if self.use_systemd else "supervisor"
            res.worker = f"{node} pid {pid} ({mode})"
            res.revision = self.rev
            res.status = "ok"
            res.detail = native
        except HostError as exc:
            res.detail = str(exc)
        except Exception as exc:  # an unexpected failure stays this host's failure
            res.detail = f"{type(exc).__name__}: {_one_line(str(exc))}"
        finally:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()
        res.detail = self.opts.masker(res.detail)
        return res


def deploy_hosts(hosts: list[Host], opts: DeployOptions, parallel: int = 8) -> list[HostResult]:
    """Deploy every host (thread pool); results in the order of ``hosts``."""
    houses = _Wheelhouses(opts)
    todo: list[Host] = []
    results: dict[str, HostResult] = {}
    for h in hosts:
        if h.address == "local":
            results[h.name] = HostResult(h.name, "skipped", detail="address 'local': served by the local farm")
        else:
            todo.append(h)
    if todo:
        if opts.archive is None:
            opts.archive = opts.revision.archive()
        if not opts.reqs:
            opts.reqs = requirements(opts.revision)
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="deploy") as pool:
            for h, res in zip(todo, pool.map(lambda h: HostDeploy(h, opts, houses).run(), todo), strict=True):
                results[h.name] = res
    return [results[h.name] for h in hosts]


def render_table(results: list[HostResult]) -> str:
    rows = [("HOST", "RESULT", "REVISION", "ACTION", "WORKER", "DETAIL")]
    rows += [(r.name, r.status, r.revision[:24], r.action, r.worker, r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
                     for row in rows).rstrip() + "\n"


def _repo_default() -> Path:
    return Path(__file__).resolve().parent.parent


@click.command("deploy")
@click.option("--inventory", default="inventory", show_default=True, help="Inventory file or directory.")
@click.option("--hosts", "host_names", default=None, help="Comma-separated host names (default: all).")
@click.option("--known-hosts", "known_hosts", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="known_hosts file(s) the host keys must be in [default ~/.ssh/known_hosts].")
@click.option("--identity", "identities", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="SSH private key(s); without one, the ssh agent and ~/.ssh keys are tried.")
@click.option("--user", default=None, help="SSH user for hosts whose inventory entry has none.")
@click.option("--broker-url", envvar="FARM_BROKER_URL", required=True,
              help="Broker URL the agents use, with password [env FARM_BROKER_URL; prefer the env: argv is "
                   "visible in ps]. A rediss:// URL's ssl_ca_certs file is shipped to the hosts.")
@click.option("--parallel", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--root", "default_root", default=DEFAULT_ROOT, show_default=True,
              help="Deploy root on hosts without a 'deploy_root' label.")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Git repository to deploy from [default: this pmufarm checkout].")
@click.option("--rev", default=None, help="Commit to deploy [default HEAD].")
@click.option("--allow-dirty", is_flag=True, help="Ship a snapshot of uncommitted changes.")
@click.option("--force", is_flag=True, help="Reinstall even if the host already has the revision.")
@click.option("--restart", is_flag=True, help="Restart workers even when nothing changed.")
@click.option("--service", type=click.Choice(["auto", "systemd", "supervisor"]), default="auto", show_default=True,
              help="How the worker runs: systemd unit (if PID 1 is systemd) or pmufarm-supervise.")
@click.option("--signing-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Celery message signing: dir with agent.key, agent.pem, certs/*.pem (and orchestrator.key/.pem "
                   "for the ping); see orchestrator/broker.py.")
@click.option("--agent-url-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Per-host broker URLs (<host>.url from `broker-acl --inventory`): each agent gets its own "
                   "restricted user instead of --broker-url's.")
@click.option("--connect-timeout", default=10.0, show_default=True)
@click.option("--ping-timeout", default=90.0, show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Wheelhouse cache and deploy logs [env FARM_STATE_DIR].")
def deploy(inventory: str, host_names: str | None, known_hosts: tuple[Path, ...], identities: tuple[str, ...],
           user: str | None, broker_url: str, parallel: int, default_root: str, source: Path | None, rev: str | None,
           allow_dirty: bool, force: bool, restart: bool, service: str, signing_dir: Path | None,
           agent_url_dir: Path | None, connect_timeout: float, ping_timeout: float, state_dir: Path | None) -> None:
    """Install the agent at this revision on farm hosts and start their workers (SSH, in parallel).

    Exit 0 if every host is ok, 3 if any failed (the table says why), 2 for bad input.
    """
    agent_urls = {f.stem: f.read_text().strip() for f in sorted(agent_url_dir.glob("*.url"))} if agent_url_dir else {}
    masker = Masker(urls=[broker_url, *agent_urls.values()])
    if state_dir is None:
        ctx = click.get_current_context(silent=True)
        state_dir = getattr(getattr(ctx, "obj", None), "state_dir", None) or _default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "logs" / f"deploy-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_lock = threading.Lock()

    def echo(msg: str) -> None:
        line = masker(msg)
        with log_lock:
            click.echo(line, err=True)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}\n")

    def bad(msg: str) -> None:
        click.echo(f"orchestrator deploy: {masker(msg)}", err=True)
        sys.exit(EXIT_INPUT)

    if not broker_url.startswith(("redis://", "rediss://")):
        bad("--broker-url must be redis:// or rediss:// (agents on other machines cannot use a unix socket)")
    if is_tls(broker_url):
        ca = url_query(broker_url).get("ssl_ca_certs")
        if ca and not Path(ca).is_file():
            bad(f"ssl_ca_certs {ca}: no such file")
    if signing_dir:
        missing = [p for p in ("agent.key", "agent.pem", "certs") if not (signing_dir / p).exists()]
        if missing:
            bad(f"--signing-dir {signing_dir}: missing {', '.join(missing)}")
    for f in known_hosts:
        if not f.is_file():
            bad(f"--known-hosts {f}: no such file (host keys are checked strictly)")
    kh = list(known_hosts) or [f for f in (Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts"))
                               if f.is_file()]
    if not kh:
        bad("no known_hosts file: pass --known-hosts (host keys are checked strictly; unknown hosts are refused)")
    try:
        hosts = select_hosts(load_inventory(inventory), host_names, {})
    except InventoryError as exc:
        bad(str(exc))
    if all(h.address == "local" for h in hosts):
        results = [HostResult(h.name, "skipped", detail="address 'local': served by the local farm") for h in hosts]
        click.echo(render_table(results), nl=False)
        sys.exit(EXIT_OK)
    if agent_url_dir:
        missing = [h.name for h in hosts if h.address != "local" and h.name not in agent_urls]
        if missing:
            bad(f"--agent-url-dir {agent_url_dir}: no {missing[0]}.url (make them with broker-acl --inventory)")
    try:
        revision = resolve_revision(source or _repo_default(), rev, allow_dirty)
    except SourceError as exc:
        bad(str(exc))
    opts = DeployOptions(revision=revision, broker_url=broker_url, known_hosts=kh, identities=list(identities),
                         state_dir=state_dir, default_root=default_root, user=user, force=force, restart=restart,
                         connect_timeout=connect_timeout, ping_timeout=ping_timeout, service=service,
                         signing_dir=signing_dir, masker=masker, echo=echo, agent_urls=agent_urls)
    echo(f"deploying revision {revision.name} to {len(hosts)} host(s): {', '.join(h.name for h in hosts)}")
    from orchestrator.broker import persistence_problem

    if why := persistence_problem(broker_url):
        echo(f"warning: the farm broker {why}")
    try:
        results = deploy_hosts(hosts, opts, parallel)
    except SourceError as exc:
        bad(str(exc))
    table = masker(render_table(results))
    click.echo(table, nl=False)
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(table)
    failed = [r for r in results if r.status == "error"]
    if failed:
        click.echo(f"orchestrator deploy: {len(failed)} of {len(results)} host(s) failed", err=True)
    sys.exit(EXIT_HOSTS_FAILED if failed else EXIT_OK)


def _default_state_dir() -> Path:
    return Path(os.environ.get("FARM_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")), "pmufarm"))


if __name__ == "__main__":
    deploy()
