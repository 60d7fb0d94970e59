"""A small tool-using agent loop written against the `openai` package, pointed at dinfer-serve.

    python examples/openai_agent.py                     # starts dinfer-serve (bundled model)
    python examples/openai_agent.py --base-url http://127.0.0.1:8000/v1 --api-key KEY

An agent loop parses tool calls out of plain text, runs them, and feeds the results into later
calls. The bundled model has no tool template (dinfer-serve answers `tools` with a 400), so the
calls are plain-text lines, `SKILL ARGUMENT -> NAME`, where `{NAME}` in a later argument is an
earlier result. Each call is answered by the model through /v1/chat/completions (its skills are
the bundled task suite: add, reverse, sort, count, copy) and checked by a local Python tool; a
wrong answer is retried with sampling (temperature > 0, a new seed). Calls whose inputs are
ready run concurrently and share the worker's forwards. With an instruction model, the plan
itself would come from the model, parsed by the same `parse_call`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai

PLAN = """
add 12+34 -> first
add 29+47 -> second
sort {first}{second} -> digits
reverse planet -> word
in abcdab count a -> count
copy green apple -> phrase
"""
CALL = re.compile(r"^\s*(add|reverse|sort|count|copy|in)\s+(.+?)\s*->\s*(\w+)\s*$")
TRIES = 3


@dataclass
class Model:
    client: openai.AsyncOpenAI
    name: str  # the id dinfer-serve lists in /v1/models


def check(skill: str, argument: str) -> str:
    """The local tools: what the model's answer must be."""
    if skill == "add":
        a, b = argument.split("+")
        return f"{int(a) + int(b):03d}"
    if skill == "reverse":
        return argument[::-1]
    if skill == "sort":
        return "".join(sorted(argument))
    if skill == "in":  # "in WORD count LETTER"
        word, _, letter = argument.partition(" count ")
        return str(word.count(letter))
    return argument  # copy


def parse_call(line: str) -> tuple[str, str, str] | None:
    """`SKILL ARGUMENT -> NAME` -> (skill, argument, name); None for anything else."""
    m = CALL.match(line)
    return (m.group(1), m.group(2), m.group(3)) if m else None


async def run_call(llm: Model, skill: str, argument: str) -> tuple[str, int]:
    """Ask the model; on a wrong answer, sample again. Returns (answer, tries)."""
    prompt = f"{skill} {argument}"
    expected = check(skill, argument)
    answer = ""
    for attempt in range(TRIES):
        reply = await llm.client.chat.completions.create(
            model=llm.name,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=64,
            temperature=0.0 if attempt == 0 else 0.7,
            seed=attempt,
            stop="\n",  # one line is one answer
        )
        answer = (reply.choices[0].message.content or "").strip()
        if answer == expected:
            return answer, attempt + 1
    return answer, TRIES


async def agent(llm: Model, plan: str) -> dict[str, str]:
    calls = [c for c in map(parse_call, plan.strip().splitlines()) if c]
    results: dict[str, str] = {}
    while calls:
        ready = [c for c in calls if all(n in results for n in re.findall(r"{(\w+)}", c[1]))]
        if not ready:
            raise ValueError(f"the plan refers to results no call produces: {calls}")
        arguments = [arg.format(**results) for _, arg, _ in ready]
        answers = await asyncio.gather(
            *(run_call(llm, skill, arg) for (skill, _, _), arg in zip(ready, arguments))
        )
        for (skill, _, name), arg, (answer, tries) in zip(ready, arguments, answers):
            ok = "ok" if answer == check(skill, arg) else f"tool says {check(skill, arg)!r}"
            print(f"{skill + ' ' + arg:24} -> {name} = {answer!r}  ({ok}; tries: {tries})")
            results[name] = answer
            calls.remove(next(c for c in calls if c[2] == name))
    return results


async def stream_summary(llm: Model, results: dict[str, str]) -> None:
    """The final answer, streamed: deltas of stable text as the blocks are denoised."""
    stream = await llm.client.chat.completions.create(
        model=llm.name,
        messages=[{"role": "user", "content": f"copy {results['phrase']}"}],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("summary: ", end="", flush=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n({chunk.usage.completion_tokens} tokens in {chunk.usage.forwards} forwards)")


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "dinfer_async.serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("dinfer-serve did not start")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=None, help="a running dinfer-serve (default: start one)")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    proc, url = start_server() if args.base_url is None else (None, args.base_url)
    try:
        client = openai.AsyncOpenAI(base_url=url, api_key=args.api_key, max_retries=1)
        llm = Model(client, (await client.models.list()).data[0].id)
        results = await agent(llm, PLAN)
        await stream_summary(llm, results)
        tool = {"type": "function", "function": {"name": "calc"}}
        try:
            await client.chat.completions.create(
                model=llm.name, messages=[{"role": "user", "content": "sort 1"}], tools=[tool]
            )
        except openai.BadRequestError as e:
            print(f"tools are refused with a 400 naming the field: {e.body['param']!r}")
        await client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
