"""ZeroMQ transport security: CURVE encryption and authentication for remote workers.

A worker that other hosts can reach encrypts every frame with CURVE (ZeroMQ's elliptic-curve
transport, RFC 26): its secret key proves it is the worker the client expects, and, with a
directory of authorized client public keys, only those clients complete the handshake. Keys are
ZeroMQ certificate files (`dinfer-keys DIR` writes a pair for the server and one for a client).
The handshake happens per connection, so what it proves cannot be replayed by another socket.
No torch here: the client uses it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TypeVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from dinfer_async.errors import DinferError

SocketT = TypeVar("SocketT", bound=zmq.Socket)


class KeyFileError(DinferError, ValueError):
    """A key file or directory cannot be used; the message names it and the fix."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and the name localhost; a name that
    merely starts with "127." (127.evil.example) is not an address and is not loopback."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def load_public_key(path: str | os.PathLike) -> bytes:
    """The public key in a certificate file (either the public `.key` or the `.key_secret`)."""
    public, _ = _load(path)
    return public


def load_key_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` certificate file."""
    public, secret = _load(path)
    if not secret:
        raise KeyFileError(
            f"{path}: holds no secret key; pass the .key_secret file (dinfer-keys DIR writes one)"
        )
    return public, secret


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise KeyFileError("this pyzmq/libzmq build has no CURVE support; install pyzmq from PyPI")
    if not Path(path).is_file():
        raise KeyFileError(f"{path}: no such key file; create keys with `dinfer-keys DIR`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise KeyFileError(
            f"{path}: not a ZeroMQ certificate ({e}); create keys with dinfer-keys"
        ) from e
    if not public:
        raise KeyFileError(f"{path}: no public key in it; create keys with `dinfer-keys DIR`")
    return public, secret


def secure_dealer(
    sock: SocketT,
    server_public_key_file: str | os.PathLike | None,
    client_secret_key_file: str | os.PathLike | None = None,
) -> SocketT:
    """Make a client socket speak CURVE to a worker (call before connect). Without a server key
    file this does nothing (ipc:// and loopback workers). Without a client key a fresh key pair
    is made: enough for workers that authorize any client (they then check a shared secret)."""
    if server_public_key_file is None:
        return sock
    server = load_public_key(server_public_key_file)
    if client_secret_key_file is not None:
        public, secret = load_key_pair(client_secret_key_file)
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
    return sock


def secure_router(
    sock: zmq.Socket,
    server_secret_key_file: str | os.PathLike,
    authorized_clients_dir: str | os.PathLike | None = None,
) -> ThreadAuthenticator | None:
    """Make a worker socket a CURVE server (call before bind). With a directory of client
    public keys (`*.key`), a ZAP handler admits only those clients; the caller stops the
    returned authenticator on close."""
    public, secret = load_key_pair(server_secret_key_file)
    auth = None
    if authorized_clients_dir is not None:
        directory = Path(authorized_clients_dir)
        if not directory.is_dir() or not any(directory.glob("*.key")):
            raise KeyFileError(
                f"{directory}: no client public keys (*.key) in it; copy each client's .key file "
                "there (dinfer-keys DIR puts one in DIR/authorized_clients)"
            )
        auth = ThreadAuthenticator(sock.context)
        auth.start()
        auth.configure_curve(domain="*", location=str(directory))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth
