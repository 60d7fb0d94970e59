"""A small tool-using agent loop with the client as its model.

The bundled model only knows its task suite (add, reverse, sort, count, copy), so the "agent"
here plans with plain Python and delegates each sub-task to the model as a tool call, checking
the answers it gets back. With a real instruction model, the same loop would let the model pick
the tool; the plumbing (concurrent requests, typed errors, streaming) is what this shows.

    python examples/agent.py
"""

import anyio

from dinfer_async import Client, InvalidRequestError, SamplingParams

PARAMS = SamplingParams(gen_length=64, block_length=32)


def local_tools():
    """Tools the agent may run itself, to check the model's answers."""
    return {
        "add": lambda a, b: f"{int(a) + int(b):04d}",
        "reverse": lambda w: w[::-1],
        "sort": lambda d: "".join(sorted(d)),
    }


async def ask(client: Client, prompt: str) -> str:
    completion = await client.generate(
        messages=[{"role": "user", "content": prompt}], params=PARAMS
    )
    return completion.text.strip()


async def main() -> None:
    goal = [
        "reverse agent",
        "add 123+456",
        "sort 93715",
        "in abacad count a",
        "copy the quick brown fox",
    ]
    tools = local_tools()
    async with Client(workers=1) as client:
        answers: dict[str, str] = {}

        async def work(step: str) -> None:
            answers[step] = await ask(client, step)

        async with (
            anyio.create_task_group() as tg
        ):  # the sub-tasks run concurrently, batched by the worker
            for step in goal:
                tg.start_soon(work, step)
        for step in goal:
            verb, _, arg = step.partition(" ")
            check = tools.get(verb)
            expected = check(*arg.split("+")) if check else None
            verdict = (
                ""
                if expected is None
                else (" (checked)" if answers[step] == expected else f" (tool says {expected})")
            )
            print(f"{step!r:32} -> {answers[step]!r}{verdict}")
        try:
            await ask(client, "")
        except InvalidRequestError as e:
            print(f"a bad request is refused without harm: {e}")


if __name__ == "__main__":
    anyio.run(main)
