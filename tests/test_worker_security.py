"""Remote-worker security: greetings bound to the connection, CURVE, the loopback check, keys."""

from __future__ import annotations

import stat
import time

import anyio
import pytest
import zmq

from dinfer_async import Client
from dinfer_async import protocol as wire
from dinfer_async.keys import create_keys
from dinfer_async.keys import main as keys_main
from dinfer_async.transport import is_loopback
from tests.worker_peers import ASK, FAST, SLOW, Peer, serving
from workers.main import check_endpoint
from workers.worker import Worker

SILENCE = 1.5  # seconds a refused peer waits to show it got nothing (a bound, not a timing check)


@pytest.fixture(scope="module")
def engine():
    from workers import Engine

    return Engine.from_pretrained(None)


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("::ffff:127.0.0.1", True),
        ("127.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("0.0.0.0", False),
        ("*", False),
        ("10.0.0.1", False),
        ("128.0.0.1", False),
        ("::", False),
        ("0177.0.0.1", False),
        ("", False),
    ],
)
def test_loopback_is_an_address_check_not_a_prefix(host, loopback):
    assert is_loopback(host) is loopback


def test_remote_binds_need_curve_and_client_authentication():
    assert check_endpoint("ipc:///tmp/x.sock", False, "") is None
    assert check_endpoint("tcp://127.0.0.1:5555", False, "") is None
    assert check_endpoint("tcp://[::1]:5555", False, "") is None
    assert "not loopback" in check_endpoint("tcp://127.evil.example:5555", False, "")
    assert "not loopback" in check_endpoint("tcp://0.0.0.0:5555", False, "s3cret")
    assert "CURVE" in check_endpoint("tcp://0.0.0.0:5555", True, "s3cret")  # clear text: no
    assert "client authentication" in check_endpoint("tcp://0.0.0.0:5555", True, "", "k")
    assert check_endpoint("tcp://0.0.0.0:5555", True, "s3cret", "k") is None
    assert check_endpoint("tcp://0.0.0.0:5555", True, "", "k", "clients/") is None
    assert "no port" in check_endpoint("tcp://127.0.0.1", False, "")
    assert "ipc://PATH" in check_endpoint("udp://127.0.0.1:5", False, "")


def test_a_reused_routing_id_gets_nothing_without_its_own_hello(engine, tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    with serving(Worker(engine, endpoint, secret="s3cret")) as worker:
        first = Peer(endpoint, routing_id=b"victim")
        assert isinstance(first.hello("s3cret"), wire.Welcome)
        first.submit("a", messages=ASK)
        assert isinstance(first.finish("a"), wire.Chunk)
        first.close()
        # ZeroMQ refuses a second live connection with the same routing id; the attack is a
        # socket that takes the id over once the first has gone
        for _ in range(300):
            if not worker.greeted:
                break
            time.sleep(0.01)

        again = Peer(endpoint, routing_id=b"victim")  # same routing id, a new connection
        again.submit("b", messages=ASK)
        refused = again.finish("b")
        assert isinstance(refused, wire.Error) and refused.field == "hello"
        assert refused.request_id == "b"  # the refusal reaches the stream that asked
        wrong = again.hello("s3cre")
        assert isinstance(wrong, wire.Error) and wrong.field == "secret"
        again.submit("c", messages=ASK)
        assert isinstance(again.finish("c"), wire.Error)
        assert isinstance(again.hello("s3cret"), wire.Welcome)
        again.submit("d", messages=ASK)
        assert isinstance(again.finish("d"), wire.Chunk)
        again.close()


def test_a_closed_connection_ends_its_requests(engine, tmp_path):
    endpoint = f"ipc://{tmp_path}/w.sock"
    with serving(Worker(engine, endpoint)) as worker:
        leaving, watcher = Peer(endpoint), Peer(endpoint)
        assert isinstance(leaving.hello(), wire.Welcome)
        assert isinstance(watcher.hello(), wire.Welcome)
        leaving.submit("slow", messages=ASK, params=SLOW)
        assert isinstance(leaving.recv(), wire.Updates)  # it is running
        leaving.close()
        for _ in range(600):
            watcher.send(wire.Ping())
            pong = watcher.recv()
            if isinstance(pong, wire.Pong) and pong.active == 0:
                break
        assert pong.active == 0 and not worker.live
        watcher.close()


@pytest.fixture
def keys(tmp_path):
    return create_keys(tmp_path / "keys")


def test_dinfer_keys_writes_pairs_it_never_overwrites(tmp_path):
    directory = tmp_path / "k"
    assert keys_main([str(directory)]) == 0
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        assert (directory / name).is_file()
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    assert (directory / "authorized_clients" / "client.key").is_file()
    server = (directory / "server.key_secret").read_bytes()
    assert keys_main([str(directory)]) == 2  # the client pair exists: refused, not rewritten
    assert keys_main([str(directory), "--client", "bob"]) == 0
    assert (directory / "server.key_secret").read_bytes() == server
    assert sorted(p.name for p in (directory / "authorized_clients").iterdir()) == [
        "bob.key",
        "client.key",
    ]


async def test_curve_serves_the_right_key_and_nothing_else(engine, keys, tmp_path):
    other = create_keys(tmp_path / "other")  # a key pair the worker does not know
    worker = Worker(
        engine,
        "tcp://127.0.0.1:*",
        curve_secret_key=str(keys["server_secret"]),
        authorized_clients=str(keys["authorized"].parent),
    )
    with serving(worker):
        endpoint = worker.endpoint
        server, client = str(keys["server_public"]), str(keys["client_secret"])
        with anyio.fail_after(60):
            good = await Client.connect(endpoint, server_key=server, client_key=client)
            try:
                assert (await good.generate(messages=ASK, params=FAST)).finish_reason
                refused = [
                    Peer(endpoint),  # plain text
                    Peer(endpoint, server_key=str(other["server_public"]), client_key=client),
                    Peer(endpoint, server_key=server, client_key=str(other["client_secret"])),
                    Peer(endpoint, server_key=server),  # an unlisted, fresh client key
                ]
                for peer in refused:
                    peer.send(wire.Hello(protocol=wire.PROTOCOL_VERSION), wait=False)
                    peer.send(wire.Submit("x", FAST, messages=ASK), wait=False)
                for peer in refused:
                    assert peer.recv(SILENCE) is None
                    peer.close()
                assert (await good.generate(messages=ASK, params=FAST)).finish_reason
            finally:
                await good.close()


def test_curve_without_a_client_list_still_checks_the_secret(engine, keys):
    worker = Worker(
        engine, "tcp://127.0.0.1:*", "s3cret", curve_secret_key=str(keys["server_secret"])
    )
    with serving(worker):
        server = str(keys["server_public"])
        anyone = Peer(worker.endpoint, server_key=server)  # encrypted, any client key
        assert isinstance(anyone.hello("nope"), wire.Error)
        assert isinstance(anyone.hello("s3cret"), wire.Welcome)
        anyone.submit("a", messages=ASK)
        assert isinstance(anyone.finish("a"), wire.Chunk)
        anyone.close()
        assert worker.socket.getsockopt(zmq.CURVE_SERVER) == 1
