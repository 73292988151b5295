"""``spa data make``, ``spa data show`` and ``spa data check``."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


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


def _check(args: argparse.Namespace) -> int:
    from spa.config import RunConfig
    from spa.data.check import check_dataset
    from spa.errors import SpaWarning
    from spa.tasks.base import get_task

    if args.spec == "builtin" and not (Path(args.data_dir) / "meta.json").is_file():  # a check makes no data
        raise FileNotFoundError(
            f"no built-in set under {args.data_dir} to check (spa data make --out {args.data_dir} makes one; "
            "spa train makes it on first use)"
        )
    spec = f"builtin:{args.data_dir}" if args.spec == "builtin" else args.spec  # the set there, as it is
    cfg = RunConfig(task=args.task, data=spec, data_dir=args.data_dir)
    task = get_task(args.task)
    splits = {"train": None, "val": None}
    # what opening the data repaired or assumed (dropped boxes, no split) goes into the summary as notes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpaWarning)
        try:
            splits["train"], splits["val"] = task.datasets(cfg)
        except FileNotFoundError:  # a set with one split only (e.g. VOC val): check what there is
            splits = {"val": task.eval_dataset(cfg)}
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, SpaWarning)))
    for w in caught:  # other warnings (deprecations, other libraries'...) as they would have been shown
        if not issubclass(w.category, SpaWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    bad = 0
    for split, dataset in splits.items():
        report = check_dataset(dataset, args.mode, f"{args.spec} ({split})")
        report.notes = notes if split == next(iter(splits)) else []  # once, under the first split
        if args.task != "detect":
            report.without_boxes = None  # boxes of multi-label views only make selection labels
        print(report.summary(limit=args.limit))
        bad += len(report.problems) + (report.items == 0)  # an empty split is a problem too
    return 1 if bad else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``spa data {make,show,check}``."""
    from spa.config import positive_int

    p = subparsers.add_parser("data", help="built-in dataset: generate and look at it; check any data spec")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    m = sub.add_parser("make", help="generate the built-in COCO-format detection set (no download)")
    m.add_argument("--out", required=True, help="output folder (gets train/, val/, meta.json)")
    m.add_argument(
        "--coverage",
        type=float,
        default=0.2,
        help="target fraction of image area covered by objects (default 0.2)",
    )
    m.add_argument("--images", type=positive_int, default=64, help="training images (default 64)")
    m.add_argument("--val-images", type=int, default=16, help="validation images (default 16; 0: none)")
    m.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    m.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    m.add_argument(
        "--clutter", type=float, default=3.0, help="mean number of distractors per image (default 3)"
    )
    m.set_defaults(func=_make)

    s = sub.add_parser("show", help="draw a few samples with their boxes and masks to a PNG")
    s.add_argument("dir", help="a COCO folder with annotations.json, or a built-in set's folder")
    s.add_argument("--out", required=True, help="PNG to write (.png is added to a name without a suffix)")
    s.add_argument("-n", type=positive_int, default=8, help="number of samples (default 8)")
    s.add_argument("--split", default=None, help="split of a built-in set (default train)")
    s.set_defaults(func=_show)

    from spa.data.specs import DATA_SPEC_HELP

    c = sub.add_parser(
        "check",
        help="read every annotation and open every image of a data spec; list all problems (exit 1 if any, or "
        "if a split is empty)",
        epilog=f"SPEC: {DATA_SPEC_HELP}",
    )
    c.add_argument("spec", help="a data spec, as spa train --data takes it")
    c.add_argument(
        "--task", default="detect", choices=("detect", "classify", "multilabel"), help="how to read it"
    )
    c.add_argument(
        "--mode",
        default="full",
        choices=("full", "quick"),
        help="full: decode every image (default); quick: headers",
    )
    c.add_argument("--data-dir", default="data/builtin", help="where the plain 'builtin' spec lives")
    c.add_argument("--limit", type=int, default=50, help="problems listed per split at most")
    c.set_defaults(func=_check)
