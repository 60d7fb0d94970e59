"""dinfer-keys: write CURVE key pairs for a remote worker and its clients.

    dinfer-keys DIR                 # DIR/server.key(+_secret), DIR/client.key(+_secret)
    dinfer-keys DIR --client alice  # one more client pair, authorized like the first

Layout (ZeroMQ certificate files):
    DIR/server.key_secret           the worker's --curve-secret-key (keep it on the worker)
    DIR/server.key                  the worker's public key: every client's server_key
    DIR/NAME.key_secret             a client's client_key (keep it on that client)
    DIR/authorized_clients/NAME.key the client's public key: the worker's
                                    --curve-authorized-clients DIR/authorized_clients
Existing files are never overwritten. Secret files are readable by their owner only.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import zmq.auth

log = logging.getLogger("dinfer.keys")
AUTHORIZED = "authorized_clients"


def create_keys(directory: str | os.PathLike, client: str = "client") -> dict[str, Path]:
    """Write the server pair (unless present) and the pair of `client`; return their paths."""
    if not client or not client.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--client {client!r}: use letters, digits, '-' and '_'")
    if client == "server":
        raise ValueError("--client 'server' is the worker's own name; pick another")
    root = Path(directory)
    (root / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if (root / f"{client}.key_secret").exists():
        raise FileExistsError(f"{root / client}.key_secret exists; pick another --client name")
    paths: dict[str, Path] = {}
    for name in ("server", client):
        if name == "server" and (root / "server.key_secret").exists():
            paths["server_secret"] = root / "server.key_secret"
            paths["server_public"] = root / "server.key"
            continue
        public, secret = zmq.auth.create_certificates(str(root), name)
        os.chmod(secret, 0o600)
        kind = "server" if name == "server" else "client"
        paths[f"{kind}_public"], paths[f"{kind}_secret"] = Path(public), Path(secret)
    paths["authorized"] = root / AUTHORIZED / f"{client}.key"
    shutil.copyfile(paths["client_public"], paths["authorized"])
    return paths


def main(argv: list[str] | None = None) -> int:
    from dinfer_async import __version__
    from dinfer_async.cli import Parser

    ap = Parser(
        prog="dinfer-keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("directory", help="where to write the keys (created if missing)")
    ap.add_argument("--client", default="client", help="name of the client pair (default: client)")
    ap.add_argument("--version", action="version", version=f"dinfer-keys {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(format="dinfer-keys: %(message)s", level=logging.INFO, stream=sys.stderr)
    try:
        paths = create_keys(args.directory, args.client)
    except (OSError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    d = Path(args.directory)
    log.info(
        "wrote keys in %s\n  worker: dinfer-worker --curve-secret-key %s "
        "--curve-authorized-clients %s ...\n  client: Client.connect(endpoint, server_key=%r, "
        "client_key=%r)",
        d,
        paths["server_secret"],
        d / AUTHORIZED,
        str(paths["server_public"]),
        str(paths["client_secret"]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
