"""A small tool-using agent loop with the client as its model.

The bundled model only knows its task suite (add, reverse, sort, count, copy), so the "agent"
here plans with plain Python and delegates each sub-task to the model, checking each answer
with a local tool. With a real instruction model, the same loop would let the model pick the
tool; the plumbing (concurrent requests batched by one worker, typed errors) is what this shows.

    python examples/agent.py
"""

import anyio

from dinfer_async import Client, InvalidRequestError, SamplingParams
from dinfer_async.logs import setup_logging

PARAMS = SamplingParams(gen_length=64, block_length=32)


def check(step: str) -> str:
    """What a local tool computes for a sub-task: the answer the model should give."""
    verb, _, arg = step.partition(" ")
    if verb == "add":
        a, b = arg.split("+")
        return f"{int(a) + int(b):03d}"  # the suite's sums are zero-padded to three digits
    if verb == "reverse":
        return arg[::-1]
    if verb == "sort":
        return "".join(sorted(arg))
    if verb == "copy":
        return arg
    word, letter = arg.split(" count ")  # "in abacad count a"
    return str(word.count(letter))


async def ask(client: Client, prompt: str, params: SamplingParams = PARAMS) -> str:
    completion = await client.generate(
        messages=[{"role": "user", "content": prompt}], params=params
    )
    return completion.text.strip()


async def main() -> None:
    plan = [
        "reverse agent",
        "add 29+47",
        "sort 93715",
        "in abacad count a",
        "copy quick brown fox jumps",
    ]
    async with Client(workers=1) as client:
        answers: dict[str, str] = {}

        async def work(step: str) -> None:
            answers[step] = await ask(client, step)

        # the sub-tasks run concurrently; the worker batches them into shared forwards
        async with anyio.create_task_group() as tg:
            for step in plan:
                tg.start_soon(work, step)
        for step in plan:
            expected = check(step)
            verdict = "checked" if answers[step] == expected else f"the tool says {expected!r}"
            print(f"{step!r:30} -> {answers[step]!r:28} ({verdict})")

        # Bad requests are refused with the field at fault; the client and worker carry on.
        refusals = {
            "by the client": dict(messages=[{"role": "robot", "content": "sort 8360"}]),
            "by the client, with the worker's limit": dict(
                prompt="sort 8360", params=SamplingParams(gen_length=4096, block_length=32)
            ),
            "by the worker": dict(token_ids=[10**9]),  # not an id of this model's vocabulary
        }
        for where, request in refusals.items():
            try:
                await client.generate(**request)
            except InvalidRequestError as e:
                print(f"refused {where}: field {e.field!r}: {e.reason}")
        answer = await ask(client, "sort 8360")
        print(f"and the next request is served as usual: 'sort 8360' -> {answer!r}")


if __name__ == "__main__":
    setup_logging()
    anyio.run(main)
