"""CURVE key folders: what `omni keys generate DIR` writes, and what each side reads.

    DIR/server.key                the server's public key; copy it to every stage host
    DIR/server.key_secret         the server's key pair; it never leaves the server host
    DIR/clients/NAME.key          a stage's public key; the server admits exactly these
    DIR/clients/NAME.key_secret   a stage's key pair; copy it to the host that runs that stage

The files are ZeroMQ certificates (`zmq.auth`), so ZeroMQ's own tools read them too. Secret
files are written readable by their owner only. A stage shows the server its public key in the
CURVE handshake; the server's authenticator admits it only if that key is one of
`clients/*.key`, so a stage needs both the server's public key (to know it talks to the real
server) and a key pair of its own on the allow-list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import zmq.auth
from omni.transport.sockets import (
    CurveKeys,
    check_curve_key,
    load_curve_keypair,
    load_server_curve_keys,
)

SERVER_NAME = "server"
CLIENTS_FOLDER = "clients"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def generate_key_folder(folder: str | Path, clients: Sequence[str]) -> list[Path]:
    """Write the server's key pair (unless `folder` has one) and a key pair per client name;
    returns the files written. An existing client of the same name is an error: replacing
    its key would lock out the stage that holds the old one."""
    root = Path(folder)
    if not clients:
        raise ValueError("name at least one client (a stage host), for example --client gpu-1")
    for name in clients:
        if not _CLIENT_NAME.match(name):
            raise ValueError(
                f"client name {name!r}: use letters, digits, '.', '_' and '-' (up to 64)"
            )
    if len(set(clients)) != len(clients):
        raise ValueError(f"client names repeat: {list(clients)}")
    client_dir = root / CLIENTS_FOLDER
    taken = [name for name in clients if (client_dir / f"{name}.key_secret").exists()]
    if taken:
        raise ValueError(f"{client_dir} already holds keys for {taken}; pick other names")
    client_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    written: list[Path] = []
    if not (root / f"{SERVER_NAME}.key_secret").exists():
        written += _create(root, SERVER_NAME)
    for name in clients:
        written += _create(client_dir, name)
    return written


def _create(folder: Path, name: str) -> list[Path]:
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


def load_server_keys(folder: str | Path) -> CurveKeys:
    """The server's side of `folder`: its key pair, admitting the stages of clients/*.key."""
    root = Path(folder)
    secret = root / f"{SERVER_NAME}.key_secret"
    if not secret.is_file():
        raise ValueError(f"{root} holds no {secret.name}; create it with `omni keys generate`")
    return load_server_curve_keys(secret, root / CLIENTS_FOLDER)


def read_public_key(given: str) -> str:
    """A public key from a certificate file (`server.key`) or given as its 40 Z85 characters."""
    path = Path(given).expanduser()
    if path.is_file():
        public, _ = zmq.auth.load_certificate(str(path))
        return public.decode("ascii")
    check_curve_key("the server key (a file or 40 Z85 characters)", given)
    return given


def key_pair_text(public: str, secret: str) -> str:
    """A key pair as a ZeroMQ secret certificate's text (what `--client-key` reads)."""
    check_curve_key("public key", public)
    check_curve_key("secret key", secret)
    return (
        "#   ZeroMQ CURVE secret certificate, written by omni\n"
        "metadata\ncurve\n"
        f'    public-key = "{public}"\n'
        f'    secret-key = "{secret}"\n'
    )


def load_stage_keys(server_key: str, client_key_file: str | Path) -> CurveKeys:
    """A stage's side: the server's public key and this stage's key pair (a file, or a pipe
    such as /dev/fd/N that a parent process wrote the certificate into)."""
    if not Path(client_key_file).exists():
        raise ValueError(f"client key {client_key_file} is not a file (clients/NAME.key_secret)")
    public, secret = load_curve_keypair(client_key_file)
    return CurveKeys(public_key=public, secret_key=secret, server_key=read_public_key(server_key))
