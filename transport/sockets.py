"""ZeroMQ sockets for the stage protocol: one ROUTER in the orchestrator, a DEALER per replica.

Every socket gets a maximum inbound message size (a larger message disconnects the peer instead
of being buffered) and high-water marks, so a slow peer pushes back on its sender rather than
growing memory without bound. `ipc://` and `tcp://` go through the same code; tcp is opt-in for
binding, binds exactly the host given (never a wildcard), and is encrypted and authenticated
with CURVE when keys are configured.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

_Z85_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True)
class SocketOptions:
    """Limits applied to every socket of the stage protocol."""

    # One 18 MB embedding page is the typical large message; 2 GiB bounds a corrupt length.
    max_message_bytes: int = 2 * 1024**3
    # Messages queued per peer before sends push back (EAGAIN) instead of buffering more.
    send_hwm: int = 1000
    recv_hwm: int = 1000
    # How long close() may wait to flush queued messages (a GOODBYE, say) before dropping them.
    linger_ms: int = 500

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes is {self.max_message_bytes}; the minimum is 1024")
        for name in ("send_hwm", "recv_hwm"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be >= 1")
        if self.linger_ms < 0:
            raise ValueError(f"linger_ms is {self.linger_ms}; it must be >= 0")


def check_curve_key(name: str, key: str) -> None:
    """ValueError naming `name` unless `key` is a 40-character Z85 CURVE key."""
    if not _Z85_KEY.match(key):
        raise ValueError(f"{name} must be a 40-character Z85 CURVE key")


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (Z85 text) for one side of a connection.

    The orchestrator (server) sets its own `public_key`/`secret_key` and, to admit only known
    stages, `authorized_clients`; with none listed, any peer that knows the server's public key
    may connect, unless `allow_list` says the list starts empty and grows (`allow_client`).
    A stage (client) sets its own keypair and `server_key`.
    """

    public_key: str
    secret_key: str
    server_key: str = ""
    authorized_clients: tuple[str, ...] = ()
    allow_list: bool = False

    @property
    def admits_listed_only(self) -> bool:
        return self.allow_list or bool(self.authorized_clients)

    def __post_init__(self) -> None:
        check_curve_key("public_key", self.public_key)
        check_curve_key("secret_key", self.secret_key)
        if self.server_key:
            check_curve_key("server_key", self.server_key)
        for key in self.authorized_clients:
            check_curve_key("an authorized client key", key)


def generate_curve_keypair() -> tuple[str, str]:
    """A fresh (public, secret) CURVE keypair as Z85 text."""
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def load_curve_keypair(path: str | Path) -> tuple[str, str]:
    """(public, secret) from a ZeroMQ certificate file (see zmq.auth.create_certificates)."""
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise ValueError(f"{path} holds no secret key; pass the .key_secret certificate")
    return public.decode("ascii"), secret.decode("ascii")


def load_server_curve_keys(
    secret_file: str | Path, authorized_dir: str | Path | None = None
) -> CurveKeys:
    """The orchestrator's CURVE keys from its certificate, admitting the stages whose public
    certificates (`*.key`) lie in `authorized_dir` (None: any stage holding the server key)."""
    public, secret = load_curve_keypair(secret_file)
    clients: tuple[str, ...] = ()
    if authorized_dir is not None:
        if not Path(authorized_dir).is_dir():
            raise ValueError(f"{authorized_dir} is not a directory of stage certificates")
        found = zmq.auth.load_certificates(str(authorized_dir))
        if not found:
            raise ValueError(f"{authorized_dir} holds no public certificates (*.key)")
        clients = tuple(sorted(key.decode("ascii") for key in found))
    return CurveKeys(public_key=public, secret_key=secret, authorized_clients=clients)


def check_endpoint(endpoint: str, *, binding: bool, allow_tcp: bool = False) -> str:
    """Validate a ZeroMQ endpoint; tcp binding must be allowed and name a concrete host."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"endpoint {endpoint!r} must look like ipc://PATH or tcp://HOST:PORT")
    if scheme in ("ipc", "inproc"):
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: scheme must be ipc, inproc or tcp")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not (port.isdigit() or port == "*"):
        raise ValueError(f"endpoint {endpoint!r} must be tcp://HOST:PORT")
    if binding:
        if not allow_tcp:
            raise ValueError(
                f"binding {endpoint} needs tcp enabled (allow_tcp; omni serve --stage-endpoint)"
            )
        if host in ("*", ""):
            raise ValueError(f"endpoint {endpoint!r}: name the interface to bind, not a wildcard")
    return endpoint


class _AllowListedClients:
    """ZAP credentials provider: admits exactly the listed client public keys."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = {key.encode("ascii") for key in keys}

    def allow(self, key: str) -> None:
        """Admit one more client key from now on (a Ray actor's, say)."""
        check_curve_key("a client key", key)
        self._keys.add(key.encode("ascii"))

    def disallow(self, key: str) -> None:
        """Admit `key` no more (connections already made stay: ZAP runs at the handshake)."""
        self._keys.discard(key.encode("ascii"))

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            logger.warning(
                "refused a stage connection: CURVE client key %s is not on the allow-list",
                key.decode("ascii", "replace"),
            )
        return allowed


def _apply_limits(sock: zmq.Socket, options: SocketOptions) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, options.send_hwm)
    sock.setsockopt(zmq.RCVHWM, options.recv_hwm)
    sock.setsockopt(zmq.LINGER, options.linger_ms)


class BoundRouter:
    """The orchestrator's ROUTER socket plus the ZAP authenticator guarding it, if any.

    `remote_endpoint` (tcp) opens the same socket to stages on other hosts beside the local
    `endpoint` (ipc): the local one is bound before the CURVE options are set, and ZeroMQ fixes
    a listener's security when it binds, so local stages speak plain ipc (guarded by the ipc
    folder's permissions) while remote ones must hold keys. Without `remote_endpoint`,
    `curve` applies to `endpoint` itself.

    With a tcp endpoint the socket is also monitored for closed connections (`disconnects`): a
    stage on another host that dies is seen when its TCP connection closes, not only when its
    heartbeats stop.
    """

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        options: SocketOptions | None = None,
        curve: CurveKeys | None = None,
        allow_tcp: bool = False,
        remote_endpoint: str | None = None,
    ) -> None:
        check_endpoint(endpoint, binding=True, allow_tcp=allow_tcp)
        if remote_endpoint is not None:
            check_endpoint(remote_endpoint, binding=True, allow_tcp=True)
            if not remote_endpoint.startswith("tcp://") or endpoint.startswith("tcp://"):
                raise ValueError(
                    f"remote_endpoint {remote_endpoint} must be tcp and endpoint {endpoint} "
                    "local (ipc or inproc)"
                )
        options = options or SocketOptions()
        secured = remote_endpoint or endpoint
        self._allow_list: _AllowListedClients | None = None
        self.authenticator: ThreadAuthenticator | None = None
        if curve is not None and curve.admits_listed_only:
            # The authenticator must be running before the socket binds, or early handshakes
            # would be decided without it.
            self.authenticator = _start_authenticator(context)
            self._allow_list = _AllowListedClients(curve.authorized_clients)
            self.authenticator.configure_curve_callback(
                domain="*", credentials_provider=self._allow_list
            )
        elif secured.startswith("tcp://") and curve is None:
            logger.warning(
                "%s is not encrypted: configure CURVE keys for untrusted networks", secured
            )
        self.socket: zmq.Socket = context.socket(zmq.ROUTER)
        _apply_limits(self.socket, options)
        # Sending to a peer that has gone raises instead of silently dropping the message, so
        # the request it carried fails at once.
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if remote_endpoint is not None:
            self.socket.bind(endpoint)
            self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if curve is not None:
            self.socket.setsockopt(zmq.CURVE_SERVER, 1)
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key.encode("ascii"))
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key.encode("ascii"))
        self.socket.bind(secured)
        bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # The endpoint stages on other hosts connect to (with the real port when given 0);
        # None when there is none.
        self.remote_endpoint: str | None = bound if secured.startswith("tcp://") else None
        if remote_endpoint is None:
            self.endpoint = bound
        self.disconnects: zmq.Socket | None = None
        if self.remote_endpoint is not None:
            self.disconnects = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def allow_client(self, public_key: str) -> None:
        """Admit stages holding `public_key` from now on; needs an allow-list to add to."""
        if self._allow_list is None:
            raise ValueError("this router has no client allow-list to add a key to")
        self._allow_list.allow(public_key)

    def disallow_client(self, public_key: str) -> None:
        """Refuse new connections holding `public_key` (a dead Ray actor's)."""
        if self._allow_list is not None:
            self._allow_list.disallow(public_key)

    def take_disconnects(self) -> int:
        """How many peer connections closed since the last call (0 without a monitor)."""
        if self.disconnects is None:
            return 0
        count = 0
        while True:
            try:
                self.disconnects.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return count
            count += 1

    def close(self) -> None:
        if self.disconnects is not None:
            self.socket.disable_monitor()
            self.disconnects.close(linger=0)
            self.disconnects = None
        self.socket.close()
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


# How long a new router waits for the ZAP endpoint of one closed a moment ago in this process.
ZAP_ENDPOINT_WAIT_S = 2.0


def _start_authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """A running ZAP authenticator on `context`. Its endpoint, `inproc://zeromq.zap.01`, is one
    per context, and ZeroMQ releases a closed socket's inproc endpoint asynchronously: a router
    started right after another one closed (a restart, a test after a test) can find it still
    taken for a moment, so the bind is retried for up to `ZAP_ENDPOINT_WAIT_S`."""
    deadline = time.monotonic() + ZAP_ENDPOINT_WAIT_S
    while True:
        authenticator = ThreadAuthenticator(context)
        try:
            authenticator.start()
            return authenticator
        except zmq.ZMQError as exc:
            authenticator.stop()  # closes the socket that failed to bind
            if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def connect_dealer(
    context: zmq.Context,
    endpoint: str,
    options: SocketOptions | None = None,
    curve: CurveKeys | None = None,
) -> zmq.Socket:
    """A replica's DEALER connected to the orchestrator."""
    check_endpoint(endpoint, binding=False)
    options = options or SocketOptions()
    sock = context.socket(zmq.DEALER)
    _apply_limits(sock, options)
    # Queue only on completed connections: while the orchestrator is away, sends fail fast
    # (EAGAIN) and the replica re-sends HELLO later instead of piling up stale messages.
    sock.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        if not curve.server_key:
            raise ValueError("a CURVE client needs the server's public key (server_key)")
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key.encode("ascii"))
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key.encode("ascii"))
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key.encode("ascii"))
    sock.connect(endpoint)
    return sock
