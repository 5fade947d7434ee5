"""The `diffbase` command. Heavy libraries are imported inside each command, so `--help` is fast."""

from __future__ import annotations

import argparse
import sys

from diffbase.errors import Stopped, UserError

# The modules of the commands, in the order `diffbase --help` lists them; each adds its parsers with add_parsers(sub).
COMMANDS = tuple(f"diffbase.commands.{name}" for name in ("generate", "train", "tryon", "dreamfit", "customize",
                 "upscale", "edit", "data", "zoo", "tools")) + ("diffbase.serve",)  # fmt: skip


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
    for name in COMMANDS:
        import_module(name).add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow options such as --resume
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        import diffbase.methods  # noqa: F401  (registers the methods and their config sections)
        from diffbase import progress

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
