"""``orchestrator deploy`` for real: three farm hosts as network namespaces, each with its own sshd, a
password-protected redis-server on the farm LAN, workers installed offline and answering on host.<name>.

The fast tests at the top check the broker helpers, revision snapshots and the systemd unit; everything
that starts servers is marked slow and skips, naming the missing capability, without root/`ip netns`/sshd.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.broker import (
    Masker,
    SecuredRedisServer,
    acl_lines,
    find_tls_redis_server,
    make_tls_material,
    mask,
    redis_url,
    url_password,
    with_query,
)
from orchestrator.deploy import render_unit
from orchestrator.deploy_source import Interp, SourceError, resolve_revision
from orchestrator.localfarm import free_port
from tests.conftest import ROOT
from tests.netns import NetnsLab, netns_unavailable, sshd_unavailable

HOSTS = ["alpha", "beta", "gamma"]


# ---------------------------------------------------------------- fast: helpers

def test_redis_url_encodes_password_and_tls_query() -> None:
    url = redis_url("10.0.0.1", 6380, "p@ss/w%rd:x", tls=True, ca_certs="/etc/farm/ca.pem")
    assert url == ("rediss://farm:p%40ss%2Fw%25rd%3Ax@10.0.0.1:6380/0"
                   "?ssl_cert_reqs=required&ssl_ca_certs=%2Fetc%2Ffarm%2Fca.pem")
    assert url_password(url) == "p@ss/w%rd:x"
    moved = with_query(url, ssl_ca_certs="/opt/pmufarm/etc/broker-ca.pem")
    assert "ssl_ca_certs=%2Fopt%2Fpmufarm%2Fetc%2Fbroker-ca.pem" in moved and url_password(moved) == "p@ss/w%rd:x"
    assert redis_url("::1", 1, None, tls=False) == "redis://[::1]:1/0"


def test_mask_hides_raw_encoded_and_unknown_url_passwords() -> None:
    pw = "s3cr/et@pw"
    url = redis_url("h", 1, pw)
    m = Masker(urls=[url])
    text = f"url={url} raw={pw} other=redis://u:unknownpw@x:1/0 plain=redis://x:1/0"
    out = m(text)
    assert pw not in out and "s3cr%2Fet%40pw" not in out and "unknownpw" not in out
    assert "redis://farm:***@h:1/0" in out and "plain=redis://x:1/0" in out
    assert mask("nothing secret here") == "nothing secret here"


def test_acl_disables_default_user_and_grants_channels() -> None:
    lines = acl_lines("pw-1234")
    assert lines[0] == "user default off"
    assert lines[1].startswith("user farm on #") and "&*" in lines[1] and "-@dangerous" in lines[1]
    assert "pw-1234" not in "\n".join(lines)  # only the SHA-256 is stored
    with pytest.raises(ValueError):
        acl_lines("has space")


def test_systemd_unit_renders_for_host() -> None:
    unit = render_unit("/opt/pmufarm", "alpha")
    assert "ExecStart=/bin/sh /opt/pmufarm/bin/pmufarm-worker /opt/pmufarm alpha" in unit
    assert "Restart=always" in unit and "@ROOT@" not in unit and "@HOST@" not in unit
    assert "StandardOutput=append:/opt/pmufarm/log/worker.log" in unit


def test_interp_parse_and_compatibility() -> None:
    here = Interp.local()
    assert Interp.parse(f"{here.impl} {here.version} {here.machine} {here.glibc}").served_by_local()
    assert not Interp.parse(f"{here.impl} 3.99 {here.machine} {here.glibc}").served_by_local()
    with pytest.raises(SourceError):
        Interp.parse("sh: 1: python3: not found")


def test_deploy_cli_input_errors_and_local_hosts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from orchestrator.deploy import deploy

    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts:\n  - {name: here, address: local}\n")
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    url = "redis://farm:Very-Secret-1@127.0.0.1:1/0"
    run = CliRunner().invoke
    common = ["--inventory", str(inv), "--state-dir", str(tmp_path / "st")]
    r = run(deploy, [*common, "--known-hosts", str(kh), "--broker-url", url])
    assert r.exit_code == 0 and "here" in r.output and "skipped" in r.output, r.output
    r = run(deploy, [*common, "--known-hosts", str(tmp_path / "missing")], env={"FARM_BROKER_URL": url})
    assert r.exit_code == 2 and "no such file" in r.output and "Very-Secret-1" not in r.output
    r = run(deploy, [*common, "--known-hosts", str(kh), "--broker-url", "redis+socket:///tmp/x.sock"])
    assert r.exit_code == 2 and "redis:// or rediss://" in r.output
    r = run(deploy, [*common, "--known-hosts", str(kh), "--broker-url", url, "--hosts", "nope"])
    assert r.exit_code == 2 and "unknown host 'nope'" in r.output


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(not shutil.which("git"), reason="git not found")
def test_revision_clean_dirty_and_snapshot(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    with pytest.raises(SourceError, match="no commit yet"):
        resolve_revision(repo)
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert resolve_revision(repo).name == head
    (repo / "a.txt").write_text("two\n")
    with pytest.raises(SourceError, match="uncommitted changes"):
        resolve_revision(repo)
    snap = resolve_revision(repo, allow_dirty=True)
    assert snap.name.startswith(head[:12] + "-dirty-")
    assert resolve_revision(repo, allow_dirty=True).name == snap.name  # same content, same revision
    assert snap.read("a.txt") == "two"
    assert _git(repo, "status", "--porcelain") == "M a.txt"  # index and HEAD untouched
    assert resolve_revision(repo, rev="HEAD").name == head


# ---------------------------------------------------------------- slow: a real farm in namespaces

def _skip_reason() -> str | None:
    for why in (netns_unavailable(), sshd_unavailable()):
        if why:
            return why
    if not shutil.which("git"):
        return "git not found"
    return None


class Farm:
    def __init__(self, base: Path, lab: NetnsLab, broker: SecuredRedisServer, src: Path) -> None:
        self.base, self.lab, self.broker, self.src = base, lab, broker, src
        self.revision = _git(src, "rev-parse", "HEAD")
        self.inventory = base / "inventory.yaml"
        self.inventory.write_text("hosts:\n" + "".join(
            f"  - {{name: {h.name}, address: {h.address}, user: root, "
            f"labels: {{deploy_root: {self.root(h.name)}}}}}\n" for h in lab.hosts.values()))
        self.known_hosts = lab.known_hosts(base / "known_hosts")
        self.state = base / "state"
        self.outputs: list[str] = []

    def root(self, name: str) -> Path:
        return self.base / "hosts" / name

    def deploy(self, *args: str, url: str | None = None, known_hosts: Path | None = None,
               inventory: Path | None = None, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        env |= {"FARM_BROKER_URL": url or self.broker.url, "FARM_STATE_DIR": str(self.state)}
        cmd = [sys.executable, "-m", "orchestrator.deploy", "--inventory", str(inventory or self.inventory),
               "--known-hosts", str(known_hosts or self.known_hosts), "--identity", str(self.lab.user_key),
               "--source", str(self.src), "--ping-timeout", "60", *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        self.outputs.append(r.stdout + r.stderr)
        return r

    def worker_pid(self, name: str) -> int:
        return int((self.root(name) / "run" / "worker.pid").read_text())

    def worker_mains(self, name: str) -> list[int]:
        """Main ``agent worker`` processes in the host's namespace (prefork children excluded)."""
        procs: dict[int, int] = {}
        for pid in self.lab.pids(name):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if "agent.cli worker" in cmd:
                procs[pid] = ppid
        return sorted(p for p, pp in procs.items() if pp not in procs)

    def app(self, url: str | None = None) -> Any:
        from agent.celery_app import make_app

        app = make_app(url or self.broker.url)
        app.conf.broker_connection_retry_on_startup = False
        return app

    def node(self, name: str) -> str:
        return f"{name}@{socket.gethostname()}"  # namespaces share the UTS namespace: one hostname


def _rows(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("deploy")
    lab = NetnsLab(base / "lab", HOSTS)
    broker: SecuredRedisServer | None = None
    try:
        lab.create()
        lab.start_sshd()
        broker = SecuredRedisServer(base / "broker", bind=[lab.gateway], port=free_port()).start()
        # The revision to deploy: a commit of this checkout's current files (tracked and untracked, not
        # ignored) in a private repository, so the test does not depend on what is committed here.
        src = base / "src"
        src.mkdir()
        _git(src, "init", "-q")
        _git(src, f"--work-tree={ROOT}", "add", "-A")
        _git(src, "commit", "-q", "-m", "deploy test snapshot")
        _git(src, "reset", "-q", "--hard")
        yield Farm(base, lab, broker, src)
    finally:
        lab.close()
        if broker is not None:
            broker.stop()


@pytest.fixture(scope="module")
def first_deploy(farm: Farm) -> subprocess.CompletedProcess[str]:
    return farm.deploy()


@pytest.mark.slow
def test_deploy_installs_and_starts_every_host(farm: Farm, first_deploy: subprocess.CompletedProcess[str]) -> None:
    r = first_deploy
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(r.stdout)
    native = (farm.src / "agent" / "native" / "Makefile").exists()
    app = farm.app()
    try:
        for name in HOSTS:
            assert " ok " in rows[name] and "installed, worker started" in rows[name], rows[name]
            assert ("native: built" if native else "native: none") in rows[name]
            root = farm.root(name)
            # The deployed tree is the revision, and says so; the env file is private.
            assert (root / "current" / "tree" / "REVISION").read_text().strip() == farm.revision
            env_file = root / "etc" / "agent.env"
            assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
            env = env_file.read_text()
            assert f"PMUFARM_TREE='{root}/releases/{farm.revision}/tree'" in env
            assert farm.broker.password in env
            # The installed venv holds the deps (offline install from the shipped wheelhouse).
            assert (root / "wheelhouse").is_dir() and list((root / "wheelhouse").glob("celery-*.whl"))
            assert len(farm.worker_mains(name)) == 1
            replies = app.control.ping(destination=[farm.node(name)], timeout=2)
            assert replies and list(replies[0]) == [farm.node(name)]
        # A real task through each host's queue, answered by that host's worker.
        from agent.celery_app import PROBE_FACTS, RUN_SUITE, host_queue

        model = {"driver": "model", "model": {"uarch": "icelakex"}}
        results = {n: app.send_task(PROBE_FACTS, kwargs={"host": {"name": n, **model}}, queue=host_queue(n))
                   for n in HOSTS}
        for _name, res in results.items():
            facts = res.get(timeout=60)
            assert facts and isinstance(facts, dict)
        # Suites come from the deployed tree only.
        refused = app.send_task(RUN_SUITE, kwargs={"host": {"name": "alpha", **model}, "suite": "../../etc",
                                                   "run_id": "deploy-test"}, queue=host_queue("alpha"))
        job = refused.get(timeout=60)
        assert job["log_tail"].startswith("refused"), job
    finally:
        app.close()


@pytest.mark.slow
def test_redeploy_is_idempotent(farm: Farm, first_deploy: subprocess.CompletedProcess[str]) -> None:
    assert first_deploy.returncode == 0
    pids = {n: farm.worker_pid(n) for n in HOSTS}
    t0 = time.monotonic()
    r = farm.deploy()
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    rows = _rows(r.stdout)
    for name in HOSTS:
        assert " ok " in rows[name] and "unchanged" in rows[name] and "restarted" not in rows[name], rows[name]
        assert farm.worker_pid(name) == pids[name]
        assert farm.worker_mains(name) == [pids[name]]


@pytest.mark.slow
def test_restart_force_and_crash_keep_one_worker(farm: Farm, first_deploy: subprocess.CompletedProcess[str]) -> None:
    assert first_deploy.returncode == 0
    old = {n: farm.worker_pid(n) for n in HOSTS}
    r = farm.deploy("--hosts", "alpha", "--restart")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unchanged, worker restarted" in _rows(r.stdout)["alpha"]
    assert farm.worker_pid("alpha") != old["alpha"]
    assert farm.worker_mains("alpha") == [farm.worker_pid("alpha")]
    assert not Path(f"/proc/{old['alpha']}").exists()

    r = farm.deploy("--hosts", "beta", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installed, worker restarted" in _rows(r.stdout)["beta"]
    assert farm.worker_mains("beta") == [farm.worker_pid("beta")] and farm.worker_pid("beta") != old["beta"]

    # The supervisor brings a killed worker back, still exactly one.
    os.kill(old["gamma"], 9)
    deadline = time.monotonic() + 30
    app = farm.app()
    try:
        while time.monotonic() < deadline:
            pid_file = farm.root("gamma") / "run" / "worker.pid"
            if pid_file.exists() and pid_file.read_text().strip() not in ("", str(old["gamma"])) and \
                    app.control.ping(destination=[farm.node("gamma")], timeout=1):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the supervisor did not restart gamma's worker")
    finally:
        app.close()
    assert farm.worker_mains("gamma") == [farm.worker_pid("gamma")]


@pytest.mark.slow
def test_unknown_and_changed_host_keys_are_refused(farm: Farm, first_deploy: subprocess.CompletedProcess[str],
                                                    tmp_path: Path) -> None:
    assert first_deploy.returncode == 0
    from tests.netns import keygen

    impostor = keygen(tmp_path / "impostor")
    kh = farm.lab.known_hosts(tmp_path / "known_hosts", names=["alpha", "beta"], wrong={"beta": impostor})
    r = farm.deploy(known_hosts=kh)
    assert r.returncode == 3, r.stdout + r.stderr
    rows = _rows(r.stdout)
    assert " ok " in rows["alpha"]
    assert " error " in rows["beta"] and "HOST KEY MISMATCH" in rows["beta"]
    assert " error " in rows["gamma"] and "unknown host key" in rows["gamma"] and "not in" in rows["gamma"]
    assert "2 of 3 host(s) failed" in r.stderr


@pytest.mark.slow
def test_unreachable_host_fails_alone(farm: Farm, first_deploy: subprocess.CompletedProcess[str],
                                      tmp_path: Path) -> None:
    assert first_deploy.returncode == 0
    inv = tmp_path / "inv.yaml"
    ghost = f"{farm.lab.net}.99"  # on the lab's LAN, nobody there
    inv.write_text(farm.inventory.read_text() + f"  - {{name: ghost, address: {ghost}, user: root}}\n")
    t0 = time.monotonic()
    r = farm.deploy("--hosts", "alpha,ghost", "--connect-timeout", "3", inventory=inv)
    assert r.returncode == 3, r.stdout + r.stderr
    rows = _rows(r.stdout)
    assert " ok " in rows["alpha"] and "unchanged" in rows["alpha"]
    assert " error " in rows["ghost"] and f"ssh to root@{ghost}:22" in rows["ghost"], rows["ghost"]
    assert time.monotonic() - t0 < 45


@pytest.mark.slow
def test_broker_refuses_unauthenticated_clients(farm: Farm) -> None:
    b = farm.broker
    with pytest.raises(redis.AuthenticationError):
        b.client(password=None).ping()
    with pytest.raises(redis.AuthenticationError):
        b.client(password="not-the-password").ping()
    assert b.client().ping()
    from kombu.exceptions import OperationalError

    anonymous = farm.app(f"redis://{b.host}:{b.port}/0")
    anonymous.conf.broker_connection_max_retries = 0
    try:
        with pytest.raises((OperationalError, redis.AuthenticationError)):
            anonymous.control.ping(timeout=1)
    finally:
        anonymous.close()


@pytest.mark.slow
def test_bad_broker_password_fails_host_without_leaking(farm: Farm,
                                                        first_deploy: subprocess.CompletedProcess[str]) -> None:
    assert first_deploy.returncode == 0
    b = farm.broker
    bad = "Wr0ng-" + b.password[:10]
    r = farm.deploy("--hosts", "gamma", "--ping-timeout", "6", url=redis_url(b.host, int(b.port or 0), bad))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "did not answer ping" in _rows(r.stdout)["gamma"]
    assert bad not in r.stdout + r.stderr
    # Back to the right URL: the env file changes, the worker restarts and answers.
    r = farm.deploy("--hosts", "gamma")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "restarted" in _rows(r.stdout)["gamma"]


@pytest.mark.slow
def test_secrets_never_in_output_or_logs(farm: Farm, first_deploy: subprocess.CompletedProcess[str]) -> None:
    assert first_deploy.returncode == 0
    pw = farm.broker.password
    assert farm.outputs and all(pw not in out for out in farm.outputs)
    logs = list((farm.state / "logs").glob("deploy-*.log"))
    assert logs and all(pw not in f.read_text() for f in logs)
    for name in HOSTS:
        for f in (farm.root(name) / "log").glob("*.log"):
            assert pw not in f.read_text(errors="replace"), f


@pytest.mark.slow
def test_deploy_over_rediss_ships_the_ca(farm: Farm, first_deploy: subprocess.CompletedProcess[str],
                                         tmp_path: Path) -> None:
    assert first_deploy.returncode == 0
    binary = find_tls_redis_server()
    if not binary:
        pytest.skip("no redis-server built with TLS (Debian's redis-server is)")
    tls = make_tls_material(tmp_path / "tls", [farm.lab.gateway])
    server = SecuredRedisServer(tmp_path / "tlsbroker", bind=[farm.lab.gateway], port=free_port(), tls=tls,
                                binary=binary).start()
    try:
        r = farm.deploy("--hosts", "gamma", url=server.url)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "restarted" in _rows(r.stdout)["gamma"]
        root = farm.root("gamma")
        assert (root / "etc" / "broker-ca.pem").read_bytes() == tls.ca.read_bytes()
        env = (root / "etc" / "agent.env").read_text()
        assert "rediss://" in env and f"ssl_ca_certs={str(root).replace('/', '%2F')}%2Fetc%2Fbroker-ca.pem" in env
        assert server.password not in r.stdout + r.stderr
    finally:
        r = farm.deploy("--hosts", "gamma")  # back to the plain broker for the other tests
        server.stop()
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- slow: TLS and message signing

@pytest.mark.slow
def test_rediss_url_verifies_the_broker(tmp_path: Path) -> None:
    binary = find_tls_redis_server()
    if not binary:
        pytest.skip("no redis-server built with TLS (Debian's redis-server is)")
    tls = make_tls_material(tmp_path / "tls", ["127.0.0.1"])
    server = SecuredRedisServer(tmp_path, bind=["127.0.0.1"], port=free_port(), tls=tls, binary=binary).start()
    try:
        assert server.url.startswith("rediss://farm:") and "ssl_ca_certs=" in server.url
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.ConnectionError):  # no CA given: the self-signed chain is refused
            redis.Redis.from_url(with_query(server.url, ssl_ca_certs=None), socket_timeout=3).ping()
        from agent.celery_app import make_app

        app = make_app(server.url)
        try:
            assert app.control.ping(timeout=0.5) == []  # connected and authenticated over TLS; no workers
        finally:
            app.close()
    finally:
        server.stop()


SIGNING_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from celery.contrib.testing.worker import start_worker
    from agent.celery_app import make_app
    from orchestrator.broker import enable_signing, make_signing_material
    url, d = sys.argv[1], Path(sys.argv[2])
    files = make_signing_material(d)
    plain = make_app(url)                      # sends json: must be refused by a signing worker
    plain.conf.broker_connection_retry_on_startup = False
    stray = plain.send_task("deploytest.add", args=(1, 1), queue="signed")
    worker_app = enable_signing(make_app(url), files["agent"])

    @worker_app.task(name="deploytest.add")
    def add(a, b):
        return a + b

    client = enable_signing(make_app(url), files["orchestrator"])
    with start_worker(worker_app, pool="solo", queues=["signed"], perform_ping_check=False, loglevel="WARNING"):
        assert client.send_task("deploytest.add", args=(2, 3), queue="signed").get(timeout=30) == 5
        assert client.control.ping(timeout=2), "signed ping unanswered"
        time.sleep(1)
        assert stray.state == "PENDING", stray.state
    print("SIGNING-OK")
""")


@pytest.mark.slow
def test_message_signing_accepts_signed_and_refuses_plain(tmp_path: Path) -> None:
    server = SecuredRedisServer(tmp_path, bind=["127.0.0.1"], port=free_port()).start()
    try:
        # A subprocess: setup_security() changes kombu's process-wide serializer registry.
        r = subprocess.run([sys.executable, "-c", SIGNING_SCRIPT, server.url, str(tmp_path / "sign")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert "SIGNING-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
        assert server.password not in r.stdout + r.stderr
    finally:
        server.stop()
