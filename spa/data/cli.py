"""``spa data make`` and ``spa data show``."""

from __future__ import annotations

import argparse
import json
import time


def _make(args: argparse.Namespace) -> int:
    from spa.data.builtin import make_builtin

    t0 = time.perf_counter()
    out = make_builtin(
        args.out,
        images=args.images,
        val_images=args.val_images,
        size=args.size,
        coverage=args.coverage,
        seed=args.seed,
        clutter=args.clutter,
    )
    stats = json.loads((out / "meta.json").read_text())["stats"]
    for split, s in stats.items():
        print(
            f"{out / split}: {s['images']} images, {s['objects']} objects, mean coverage {s['mean_coverage']:.3f}"
        )
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _show(args: argparse.Namespace) -> int:
    from spa.data.show import show_samples

    print(show_samples(args.dir, args.out, n=args.n, split=args.split))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa data {make,show}``."""
    p = subparsers.add_parser("data", help="built-in dataset: generate and look at it")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    m = sub.add_parser("make", help="generate the built-in COCO-format detection set (no download)")
    m.add_argument("--out", required=True, help="output folder (gets train/, val/, meta.json)")
    m.add_argument(
        "--coverage", type=float, default=0.2, help="target fraction of image area covered by objects"
    )
    m.add_argument("--images", type=int, default=64, help="training images")
    m.add_argument("--val-images", type=int, default=16, help="validation images")
    m.add_argument("--size", type=int, default=256, help="image side in pixels")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--clutter", type=float, default=3.0, help="mean number of distractors per image")
    m.set_defaults(func=_make)

    s = sub.add_parser("show", help="draw a few samples with their boxes and masks to a PNG")
    s.add_argument("dir", help="a COCO folder with annotations.json, or a built-in set's folder")
    s.add_argument("--out", required=True, help="PNG to write")
    s.add_argument("-n", type=int, default=8, help="number of samples")
    s.add_argument("--split", default=None, help="split of a built-in set (default train)")
    s.set_defaults(func=_show)
