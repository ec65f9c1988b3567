"""COCO annotations + images (local or s3://) → Parquet shards + manifest.json, read and verified with Ray Data.

The library behind ``python pipelines/prepare_data.py`` (and the sample data's first-use preparation).

Steps: parse and validate the JSON on the driver (`retina.data.coco`: structural errors stop here), then read
every image in parallel in Ray Data ``map_batches`` tasks: read the bytes, decode them (EXIF orientation and
colour conversion included), check the decoded size against the JSON's height/width. A bad image (missing,
unreadable, truncated, not an image, size mismatch) is an error naming the file by default; with
``--on-bad-image skip`` it is dropped and recorded. The check happens per row inside the UDF, so one bad file
never costs its neighbours in the same block. Good rows stream straight into Parquet with the shard schema of
docs/data.md (the ``image`` column holds the original encoded bytes; the decoder converts at read time).

Output layout (safe to re-run; never mixes two runs):

    OUTPUT/manifest.json            written last, atomically: the run id, the shard list, categories, counts,
                                    every skipped or repaired item with its reason
    OUTPUT/shards-<run_id>/*.parquet

Readers read only the shards the manifest lists. An OUTPUT that already holds a manifest is refused unless
``--overwrite``; then the new run's shards are written beside the old ones, the manifest is swapped, and the old
run's shard folder is deleted. A crashed run leaves only an unlisted folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cluster import s3
from pipelines.data.shards import FORMAT, MANIFEST, load_manifest
from retina.data.coco import DataError, Issue, ParsedCoco, parse_coco
from retina.data.transforms import ImageDecodeError, decode_image

logger = logging.getLogger("retina.prepare_data")


# The shard schema of docs/data.md, plus `crowd_labels` (the class of each crowd region: COCOeval ignores crowd
# regions per class, so evaluation needs it to reproduce the source annotations exactly).
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("boxes", pa.list_(pa.float32())),  # flattened xyxy in original pixels
        ("labels", pa.list_(pa.int32())),  # contiguous 0..K-1
        ("crowd_boxes", pa.list_(pa.float32())),  # flattened xyxy, iscrowd=1 regions
        ("crowd_labels", pa.list_(pa.int32())),
    ]
)


class BadImageError(DataError):
    """An image file is missing, unreadable, not decodable or not the size the JSON says."""


# ------------------------------------------------------------------------------------------------ per-row work


@ray.remote(num_cpus=0)
class _Collector:
    """Side channel for per-row findings (bad images, colour conversions) out of the streaming map tasks.

    Keyed by image id, so a retried task reports the same row once.
    """

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}

    def add(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.items[int(item["image_id"])] = item

    def get(self) -> list[dict[str, Any]]:
        return [self.items[k] for k in sorted(self.items)]


def _check_image(row: dict[str, Any], root: str, settings: s3.S3Settings | None) -> tuple[bytes, dict[str, Any]]:
    """Read and verify one image; return (bytes, finding) or raise BadImageError(kind) naming the file."""
    path = s3.join(root, row["file_name"])
    where = f"image id {row['image_id']} file {path}"
    try:
        data = s3.read_bytes(path, settings)
    except FileNotFoundError:
        raise BadImageError(f"{where}: missing (no such file)") from None
    except OSError as exc:
        raise BadImageError(f"{where}: unreadable: {exc}") from None
    try:
        decoded = decode_image(data, path)
    except ImageDecodeError as exc:
        raise BadImageError(f"{where}: {exc}") from None
    h, w = decoded.image.shape[:2]
    if (h, w) != (row["height"], row["width"]):
        hint = " (orientation: the EXIF tag may be missing or wrong)" if (w, h) == (row["height"], row["width"]) else ""
        raise BadImageError(
            f"{where}: decoded size {h}x{w} (h x w, after EXIF orientation) differs from the JSON's "
            f"{row['height']}x{row['width']}{hint}"
        )
    return data, {"mode": decoded.mode, "exif_transposed": decoded.exif_transposed}


def _kind(message: str) -> str:
    for key, kind in (("missing", "missing"), ("unreadable", "unreadable"), ("differs from", "size_mismatch")):
        if key in message:
            return kind
    return "undecodable"


def read_and_verify(batch: pa.Table, root: str, settings: s3.S3Settings | None, skip_bad: bool, collector) -> pa.Table:
    """map_batches UDF: a batch of annotation rows → the shard rows whose images are good (image bytes added).

    Every row is handled in its own try/except: a bad file is raised (error policy, names the file) or
    reported to `collector` and left out (skip policy). Never drops a whole block.
    """
    out, findings = [], []
    for row in batch.to_pylist():
        try:
            data, info = _check_image(row, root, settings)
        except BadImageError as exc:
            if not skip_bad:
                raise
            ref = {"image_id": row["image_id"], "file_name": row["file_name"]}
            findings.append({**ref, "bad": _kind(str(exc)), "reason": str(exc)})
            continue
        if info["mode"] != "RGB" or info["exif_transposed"]:
            findings.append({"image_id": row["image_id"], "file_name": row["file_name"], **info})
        out.append({**row, "image": data})
    if findings:
        ray.get(collector.add.remote(findings))
    return pa.Table.from_pylist(out, schema=SHARD_SCHEMA)


# ------------------------------------------------------------------------------------------------ driver


def _find_data_error(exc: BaseException) -> DataError | None:
    """Ray wraps a UDF's exception (RayTaskError / UserCodeException); dig out our DataError for a clear message."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    # Last resort: the remote traceback text carries "...BadImageError: <message>".
    match = re.search(r"BadImageError: (.+)", str(exc))
    return DataError(match.group(1).strip()) if match else None


@contextlib.contextmanager
def _data_context():
    """Shards are written in image-id order (deterministic readers), and a UDF's own exception surfaces as is."""
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order, ctx.raise_original_map_exception
    ctx.execution_options.preserve_order = True
    ctx.raise_original_map_exception = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.raise_original_map_exception = old


def _issue_counts(issues: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(i["kind"] for i in issues).items()))


@dataclass(frozen=True)
class _Run:
    """One prepare run: its inputs, its bad-image policy and where its shards go (``OUTPUT/shards-<run_id>``)."""

    annotations: str
    images: str
    output: str
    settings: s3.S3Settings | None
    rows_per_shard: int
    on_bad_image: str
    run_id: str
    started: float

    @property
    def shard_dir(self) -> str:
        return f"shards-{self.run_id}"

    @property
    def shard_root(self) -> str:
        return s3.join(self.output, self.shard_dir)


def _check_args(on_bad_image: str, rows_per_shard: int) -> None:
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")


def _read_annotations(annotations: str, settings: s3.S3Settings | None) -> ParsedCoco:
    """The JSON, parsed on the driver: structural errors stop everything before any image is read."""
    try:
        raw = s3.read_bytes(annotations, settings)
    except FileNotFoundError:
        raise DataError(f"{annotations}: annotations file not found") from None
    parsed = parse_coco(raw, name=annotations)
    logger.info("parsed %s: %d images, counts %s", annotations, len(parsed.images), parsed.counts)
    return parsed


def _new_run(output: str, settings: s3.S3Settings | None, overwrite: bool) -> tuple[dict[str, Any] | None, str]:
    """(the manifest already under `output` or None, a fresh run id); refuses to replace prepared data silently."""
    previous = load_manifest(output, settings, missing_ok=True, any_format=overwrite)
    if previous is not None and not overwrite:
        raise DataError(
            f"{output} already holds prepared data (run {previous.get('run_id')}, "
            f"{previous.get('counts', {}).get('images_written')} images); pass --overwrite to replace it"
        )
    return previous, time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _write_shards(run: _Run, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read, verify and write every image as Parquet under the run's shard folder, streaming through Ray Data;
    return the per-row findings (bad images skipped, colour conversions).

    On any failure the partial shard folder is deleted, and a bad image (wrapped by Ray) becomes a BadImageError
    naming the annotations file and the image.
    """
    fs, fs_path = s3.arrow_filesystem(run.shard_root, run.settings)
    collector = _Collector.remote()
    num_blocks = max(1, min(math.ceil(len(records) / 32), 2000))  # ~32 images per read task
    skip_bad = run.on_bad_image == "skip"
    ds = ray.data.from_items(records, override_num_blocks=num_blocks).map_batches(
        read_and_verify,
        batch_format="pyarrow",
        batch_size=None,  # one call per block; rows are checked one by one inside
        fn_kwargs={"root": run.images, "settings": run.settings, "skip_bad": skip_bad, "collector": collector},
    )
    logger.info("reading %d images from %s into %s", len(records), run.images, run.shard_root)
    try:
        with _data_context():
            rows = run.rows_per_shard
            ds.write_parquet(fs_path, filesystem=fs, min_rows_per_file=rows, max_rows_per_file=rows)
        return ray.get(collector.get.remote())
    except Exception as exc:
        s3.delete_prefix(run.shard_root, run.settings)
        data_error = _find_data_error(exc)
        if data_error is not None:
            hint = "" if skip_bad else " (pass --on-bad-image skip to skip and count bad images)"
            raise BadImageError(f"{run.annotations}: {data_error}{hint}") from exc
        raise
    finally:
        ray.kill(collector)


def _list_shards(run: _Run) -> list[dict[str, Any]]:
    """The Parquet files actually written, with their row counts (read from the footers, not trusted from Ray)."""
    fs = s3.arrow_filesystem(run.shard_root, run.settings)[0]
    shards = []
    for path in s3.list_files(run.shard_root, run.settings):
        if not path.endswith(".parquet"):
            continue
        inner = s3.arrow_filesystem(path, run.settings)[1]
        with fs.open_input_file(inner) as f:
            num_rows = pq.ParquetFile(f).metadata.num_rows
        shards.append({"path": f"{run.shard_dir}/{path.rsplit('/', 1)[-1]}", "num_rows": num_rows})
    return shards


def _issues(parsed: ParsedCoco, bad: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON's repaired/dropped annotations, then the images skipped as bad, as manifest entries."""
    issues = [i.to_json() for i in parsed.issues]
    for f in bad:
        issues.append(Issue(f["bad"], f["reason"], image_id=f["image_id"], file_name=f["file_name"]).to_json())
    return issues


def _counts(
    parsed: ParsedCoco,
    written: int,
    bad: list[dict[str, Any]],
    conversions: list[dict[str, Any]],
    issues: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest's counts: the JSON's own counts (prefixed ``json_``), then what this run wrote or repaired."""
    return {
        **{f"json_{k}": v for k, v in parsed.counts.items()},
        "images_written": written,
        "images_skipped": len(bad),
        "annotations_dropped": parsed.counts["degenerate"] + parsed.counts["outside"],
        "mode_converted": dict(sorted(Counter(f["mode"] for f in conversions if f["mode"] != "RGB").items())),
        "exif_transposed": sum(1 for f in conversions if f["exif_transposed"]),
        "issues": _issue_counts(issues),
    }


def _check_written(run: _Run, written: int, expected: int) -> None:
    """Never publish a run whose shards miss rows or hold none; its folder is deleted before raising."""
    if written != expected:
        s3.delete_prefix(run.shard_root, run.settings)
        raise DataError(f"{run.shard_root}: wrote {written} rows, expected {expected}")
    if written == 0:
        s3.delete_prefix(run.shard_root, run.settings)
        raise DataError(f"{run.annotations}: every image was skipped as bad; nothing to write (see the reasons above)")


def _manifest(
    run: _Run, parsed: ParsedCoco, shards: list[dict[str, Any]], counts: dict[str, Any], issues: list[dict[str, Any]]
) -> dict[str, Any]:
    # Key order is the order of manifest.json on disk: keep it stable for people diffing two runs.
    return {
        "format": FORMAT,
        "run_id": run.run_id,
        "created_unix": int(run.started),
        "source": {"annotations": run.annotations, "images": run.images},
        "categories": parsed.label_map.to_json(),
        "schema": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "shards": shards,
        "policy": {
            "on_bad_image": run.on_bad_image,
            "empty_images": "kept as pure negatives",
            "crowd": "iscrowd=1 → crowd_boxes/crowd_labels: ignore regions at evaluation, never training targets",
            "boxes": "w or h <= 0 dropped (degenerate); partly outside clipped; entirely outside dropped",
            "image_bytes": "original encoded bytes; EXIF orientation and colour conversion happen at decode time",
        },
        "counts": counts,
        "issues": issues,
    }


def _publish(run: _Run, manifest: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Swap in the new manifest, then delete the shard folders only the replaced manifest listed.

    The manifest goes first so a crash in between leaves unlisted folders behind, never a manifest without shards.
    """
    s3.write_bytes(s3.join(run.output, MANIFEST), json.dumps(manifest, indent=1).encode(), run.settings)
    if previous is not None and previous.get("run_id") != run.run_id:
        for old_dir in {s["path"].split("/", 1)[0] for s in previous.get("shards", [])}:
            if old_dir.startswith("shards-") and old_dir != run.shard_dir:
                s3.delete_prefix(s3.join(run.output, old_dir), run.settings)


def prepare(
    annotations: str,
    images: str,
    output: str,
    *,
    rows_per_shard: int = 512,
    on_bad_image: str = "error",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Validate, read and shard a COCO dataset; return the manifest (also written to ``OUTPUT/manifest.json``)."""
    _check_args(on_bad_image, rows_per_shard)
    annotations, images, output = str(annotations), str(images), str(output)
    settings = s3.S3Settings.from_env() if any(s3.is_s3(p) for p in (annotations, images, output)) else None
    started = time.time()
    parsed = _read_annotations(annotations, settings)
    previous, run_id = _new_run(output, settings, overwrite)
    run = _Run(annotations, images, output, settings, rows_per_shard, on_bad_image, run_id, started)

    records = [r.to_row() for r in parsed.images]
    if not records:
        raise DataError(f"{annotations}: no images listed")
    findings = _write_shards(run, records)

    shards = _list_shards(run)
    bad = [f for f in findings if "bad" in f]
    issues = _issues(parsed, bad)
    written = sum(s["num_rows"] for s in shards)
    counts = _counts(parsed, written, bad, [f for f in findings if "bad" not in f], issues)
    _check_written(run, written, len(records) - len(bad))
    manifest = _manifest(run, parsed, shards, counts, issues)
    _publish(run, manifest, previous)
    summary = f"{written} images in {len(shards)} shards to {output} ({len(bad)} skipped"
    logger.info("wrote %s, %d annotation issues) in %.1f s", summary, len(parsed.issues), time.time() - started)
    return manifest
