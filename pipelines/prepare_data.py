"""COCO annotations + images (local or s3://) → Parquet shards + manifest.json, read and verified with Ray Data.

    python pipelines/prepare_data.py --annotations PATH --images DIR --output DIR \
        [--rows-per-shard N] [--on-bad-image error|skip] [--overwrite]

A bad image (missing, unreadable, truncated, not an image, size mismatch) is an error naming the file; with
``--on-bad-image skip`` it is dropped and listed in the manifest with its reason. Re-running never mixes two
runs: see docs/data.md.
"""

from __future__ import annotations

import json
import sys

from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.docstring_parser(__doc__)
    parser.add_argument("--annotations", required=True, help="COCO json: local path or s3://bucket/key")
    parser.add_argument("--images", required=True, help="image root that file_name is relative to (local or s3://)")
    parser.add_argument("--output", required=True, help="output folder (local or s3://)")
    parser.add_argument("--rows-per-shard", type=int, default=512)
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error")
    parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --output")
    args = parser.parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        from pipelines.data.prepare import prepare

        manifest = prepare(args.annotations, args.images, args.output, rows_per_shard=args.rows_per_shard,
                           on_bad_image=args.on_bad_image, overwrite=args.overwrite)  # fmt: skip
        print(json.dumps({"output": args.output, "run_id": manifest["run_id"], "counts": manifest["counts"]}, indent=1))
        return 0

    return cli.run_command("prepare_data", body)


if __name__ == "__main__":
    sys.exit(main())
