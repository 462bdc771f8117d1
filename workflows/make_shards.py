"""Convert an ImageFolder tree (root/train, root/val) into Parquet shards for data.dataset=parquet.

Usage: python workflows/make_shards.py IMAGEFOLDER_ROOT OUT_DIR [--rows-per-shard N] [--overwrite]
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (also used by tests to check documented command lines)."""
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Convert an ImageFolder tree (IMAGEFOLDER_ROOT/train and /val, one "
                    "sub-directory per class) into OUT_DIR/train/*.parquet and OUT_DIR/val/*.parquet.")
    parser.add_argument("imagefolder_root", help="ImageFolder root holding train/ and val/")
    parser.add_argument("out_dir", help="output directory for the shards")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--split", default=None,
                        help="treat IMAGEFOLDER_ROOT as a single split and write OUT_DIR/SPLIT")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty OUT_DIR (replaces existing shards)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the shards, print their paths; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rows_per_shard <= 0:
        parser.error(f"--rows-per-shard must be positive, got {args.rows_per_shard}")
    out = pathlib.Path(args.out_dir)
    if out.exists() and not out.is_dir():
        print(f"error: OUT_DIR {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: OUT_DIR {out} is not empty; choose an empty directory or pass --overwrite",
              file=sys.stderr)
        return 2
    from pipeline.data.shards import write_parquet_shards  # after the cheap checks: imports torch
    from pipeline.errors import DataError

    try:
        written = write_parquet_shards(args.imagefolder_root, out, rows_per_shard=args.rows_per_shard,
                                       split_name=args.split, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"wrote {len(written)} shard(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
