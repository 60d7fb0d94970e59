"""A stand-in worker for the client's life-cycle and liveness tests: it speaks the wire protocol
like workers/worker.py but runs no model (no torch import), so it starts in a fraction of a
second and can be killed, stopped and restarted cheaply.

    python tests/fake_worker.py --endpoint tcp://127.0.0.1:5555 [--model NAME] [--steps N]
        [--step-delay S] [--fail-start MESSAGE] [--start-delay S]

Each request gets `--steps` chunks of one 4-token block, one per `--step-delay` seconds, the
last one with finish_reason "length". The workers.main flags the client passes are accepted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import msgspec
import zmq

from dinfer_async import protocol as wire

EOS, MASK = 1, 2


def welcome(model: str) -> wire.Welcome:
    return wire.Welcome(
        protocol=wire.PROTOCOL_VERSION,
        model=model,
        tokenizer=f"fake:{model}",
        max_prompt_length=1000,
        max_gen_length=256,
        eos_token_id=EOS,
        mask_token_id=MASK,
        pid=os.getpid(),
    )


def chunk(rid: str, step: int, steps: int) -> wire.Chunk:
    last = step == steps - 1
    return wire.Chunk(
        request_id=rid,
        block=0,
        tokens=[65 + step % 26] * 4,
        text="x" * 4,
        committed=[],
        final=last,
        stable_text="x",
        finish_reason="length" if last else None,
        stats={"forwards": steps, "tokens": steps, "tokens_per_forward": 1.0, "seconds": 0.0}
        if last
        else None,
    )


def serve(endpoint: str, model: str, steps: int, step_delay: float) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print(f"fake-worker: serving {model} on {endpoint}", file=sys.stderr, flush=True)
    greeted: set[bytes] = set()
    live: dict[str, tuple[bytes, int]] = {}
    next_step = time.monotonic()
    while True:
        wait = max(0.0, next_step - time.monotonic()) if live else 0.1
        while sock.poll(int(wait * 1000)):
            wait = 0
            client, payload = sock.recv_multipart()
            try:
                msg = wire.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                reply: wire.Message | None = wire.Error(None, "frame", "not a valid message")
            else:
                reply = None
                if isinstance(msg, wire.Hello):
                    greeted.add(client)
                    reply = welcome(model)
                elif client not in greeted:
                    reply = wire.Error(None, "hello", "send Hello first")
                elif isinstance(msg, wire.Submit):
                    live[msg.request_id] = (client, 0)
                elif isinstance(msg, wire.Abort):
                    live.pop(msg.request_id, None)
                elif isinstance(msg, wire.Ping):
                    reply = wire.Pong(active=len(live))
            if reply is not None:
                sock.send_multipart([client, wire.encode(reply)])
        if live and time.monotonic() >= next_step:
            next_step = time.monotonic() + step_delay
            for rid, (client, step) in list(live.items()):
                sock.send_multipart([client, wire.encode(wire.Updates([chunk(rid, step, steps)]))])
                if step + 1 == steps:
                    del live[rid]
                else:
                    live[rid] = (client, step + 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--step-delay", type=float, default=0.02)
    ap.add_argument("--fail-start", default=None, help="print this to stderr and exit 3")
    ap.add_argument("--start-delay", type=float, default=0.0)
    args, _ = ap.parse_known_args()  # the flags the client passes to workers.main
    time.sleep(args.start_delay)
    if args.fail_start:
        print("fake-worker: loading", file=sys.stderr)
        print(args.fail_start, file=sys.stderr, flush=True)
        sys.exit(3)
    serve(args.endpoint, args.model, args.steps, args.step_delay)


if __name__ == "__main__":
    main()
