"""Under a multi-process launcher (torchrun, `accelerate launch`): `diffbase train` for each run of the arguments,
runs separated by `--`, all in this process group (tests/test_distributed.py and tests/test_sharded.py launch it
as `-m tests.train_runs`)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from diffbase.cli import main as cli

    runs: list[list[str]] = [[]]
    for arg in argv:
        runs.append([]) if arg == "--" else runs[-1].append(arg)
    for run in runs:
        code = cli(["train", *run])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
