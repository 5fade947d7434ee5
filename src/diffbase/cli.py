"""The `diffbase` command. Heavy libraries are imported inside each command, so `--help` is fast."""

from __future__ import annotations

import argparse
import sys

from diffbase import methods
from diffbase.errors import Stopped, UserError

# The modules of the commands that belong to no method; each adds its parsers with add_parsers(sub). `--help`
# lists them around the methods' own commands (each method package's command.py).
FIRST = ("diffbase.commands.generate", "diffbase.commands.train", "diffbase.commands.evaluate")
LAST = ("diffbase.commands.data", "diffbase.commands.zoo", "diffbase.commands.tools", "diffbase.serve")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (`error: ...`, exit 2), as every other error is: a flag of the
    wrong type, a value outside its choices, a missing argument."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message.removeprefix('argument ')} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = Parser(
        prog="diffbase",
        description="Train and run diffusion image-customization models from local weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in FIRST:
        import_module(name).add_parsers(sub)
    for package in methods.packages():
        command = methods.part(package, "command")
        if command is not None:
            command.add_parsers(sub)
    for name in LAST:
        import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except UserError as exc:  # a method package named in DIFFBASE_METHODS that is not there
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow options such as --resume
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        from diffbase import progress

        methods.load_all()  # registers the methods and their config sections

        progress.set_quiet(getattr(args, "quiet", False))
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
