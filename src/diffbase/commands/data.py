"""`diffbase data synth | synth-edit | synth-dreamo`: the synthetic datasets the toys and tests train on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from diffbase.interface import checks
from diffbase.io import writable_folder


def run_synth(args: argparse.Namespace) -> None:
    from diffbase.data.synthetic import write_dataset

    h, w = checks.size(args.size, "--size", multiple=4, least=8)  # drawn at 4x in 16 px steps
    checks.count(args.n, "--n")
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 4)
    checks.count(n_test, "--n-test", least=0)
    writable_folder(args.out, "out")
    write_dataset(Path(args.out), args.n, n_test, seed=args.seed, size=(w, h))
    print(f"wrote {args.n} training and {n_test} held-out try-on items to {args.out}")


def run_synth_edit(args: argparse.Namespace) -> None:
    from diffbase.data.synthetic import write_edit_pairs

    h, w = checks.size(args.size, "--size", multiple=4, least=8)  # drawn at 4x in 16 px steps
    checks.count(args.n, "--n")
    writable_folder(args.out, "out")
    write_edit_pairs(Path(args.out), args.n, seed=args.seed, size=(w, h))
    print(f"wrote {args.n} edit pairs (source, target, mask, instruction) to {args.out}/metadata.jsonl")


def run_synth_dreamo(args: argparse.Namespace) -> None:
    from diffbase.data.synthetic import write_multi_reference
    from diffbase.generate import parse_size

    h, w = parse_size(args.size)
    checks.count(args.n, "--n")
    writable_folder(args.out, "out")
    write_multi_reference(Path(args.out), args.n, seed=args.seed, size=(w, h))
    print(
        f"wrote {args.n} two-reference items (references, target, subject masks, caption) to {args.out}/metadata.jsonl"
    )


def add_parsers(sub: Any) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="write the synthetic try-on dataset (train and held-out splits)")
    synth.add_argument("out")
    synth.add_argument("--n", type=int, default=200, help="training items")
    synth.add_argument("--n-test", type=int, help="held-out items (default n/4)")
    synth.add_argument("--size", default="64x64", help="HxW")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)
    synthetic = (
        ("synth-edit", "write synthetic paired edits (recoloured garments) for kontext / fill", "pairs", "64x64",
         "HxW", run_synth_edit),
        ("synth-dreamo", "write synthetic two-reference items (two garments placed by [ref#N])", "items", "32x32",
         "HxW of one reference (the target is twice as wide)", run_synth_dreamo),
    )  # fmt: skip
    for name, text, unit, size, size_help, func in synthetic:
        p = data.add_parser(name, help=text)
        p.add_argument("out")
        p.add_argument("--n", type=int, default=200, help=unit)
        p.add_argument("--size", default=size, help=size_help)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=func)
