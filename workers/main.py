"""dinfer-worker: the per-GPU worker process serving clients over ZeroMQ.

Not built yet: this version has the in-process Engine (workers.Engine) and dinfer-batch only.
The entry point exists so the command name is reserved; it says so and exits with status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "dinfer-worker: the ZeroMQ worker process is not implemented in this version; "
        "use workers.Engine in-process or dinfer-batch",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
