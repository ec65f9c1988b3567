"""pipelines/data/prepare.py (behind pipelines/prepare_data.py), pipelines/data/shards.py and
pipelines/data/datasets.py on real Ray: bad images, re-runs, round trip, the manifest's checks, and a rank's
decoded plan."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.data.datasets import make_collate_fn
from pipelines.data.prepare import BadImageError, prepare
from pipelines.data.shards import MANIFEST, coco_gt_from_shards, load_manifest
from retina.data.coco import DataError
from retina.data.synthetic import generate
from retina.data.transforms import EvalTransform, decode_image

pytestmark = pytest.mark.slow


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """12 synthetic images; images 7-11 re-encoded as CMYK / 16-bit / palette / RGBA / EXIF-rotated."""
    root = tmp_path_factory.mktemp("coco")
    ann = generate(root, 12, seed=3)
    images = root / "images"

    def load(i: int) -> Image.Image:
        return Image.open(images / f"{i:06d}.jpg").convert("RGB")

    (images / "000007.jpg").write_bytes(_encode(load(7).convert("CMYK"), "JPEG"))
    gray16 = (np.asarray(load(8).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    (images / "000008.jpg").write_bytes(_encode(Image.fromarray(gray16), "PNG"))  # name ≠ format: content decides
    (images / "000009.jpg").write_bytes(_encode(load(9).convert("P"), "PNG"))
    (images / "000010.jpg").write_bytes(_encode(load(10).convert("RGBA"), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; the tag says how to turn it upright
    stored = load(11).transpose(Image.Transpose.ROTATE_90)
    (images / "000011.jpg").write_bytes(_encode(stored, "JPEG", exif=exif.tobytes()))
    return ann, images


def _with_bad_images(tmp_path: Path, dataset) -> tuple[Path, Path]:
    """A copy of the dataset with 5 bad images: missing, truncated, zero bytes, text, wrong size."""
    ann, images = dataset
    bad = tmp_path / "images"
    bad.mkdir()
    for f in images.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "000002.jpg").unlink()
    data = (bad / "000003.jpg").read_bytes()
    (bad / "000003.jpg").write_bytes(data[: len(data) // 2])
    (bad / "000004.jpg").write_bytes(b"")
    (bad / "000005.jpg").write_text("this is not a JPEG")
    (bad / "000006.jpg").write_bytes(_encode(Image.new("RGB", (50, 40)), "JPEG"))
    return ann, bad


def test_prepare_writes_listed_shards_with_schema_and_conversions(ray_local, dataset, tmp_path):
    ann, images = dataset
    out = tmp_path / "shards"
    manifest = prepare(ann, images, out, rows_per_shard=5)
    assert manifest["counts"]["images_written"] == 12 and manifest["counts"]["images_skipped"] == 0
    assert manifest["counts"]["mode_converted"] == {"CMYK": 1, "I;16": 1, "P": 1, "RGBA": 1}
    assert manifest["counts"]["exif_transposed"] == 1
    assert [c["id"] for c in manifest["categories"]] == [1, 3, 7, 12, 90]
    assert len(manifest["shards"]) >= 2 and sum(s["num_rows"] for s in manifest["shards"]) == 12
    assert json.loads((out / MANIFEST).read_text()) == manifest
    table = pq.read_table(out / manifest["shards"][0]["path"])
    schema = {f.name: str(f.type) for f in table.schema}
    assert schema["image_id"] == "int64" and schema["height"] == "int32" and schema["image"] == "binary"
    assert schema["boxes"] == "list<element: float>" and schema["labels"] == "list<element: int32>"
    rows = [r for s in manifest["shards"] for r in pq.read_table(out / s["path"]).to_pylist()]
    assert [r["image_id"] for r in rows] == list(range(1, 13))  # image-id order
    for r in rows:  # original bytes kept; the decoder turns every one into upright RGB of the JSON size
        assert r["image"] == (images / r["file_name"]).read_bytes()
        assert decode_image(r["image"]).image.shape == (r["height"], r["width"], 3)


def test_bad_images_error_by_default_naming_the_file(ray_local, dataset, tmp_path):
    ann, bad = _with_bad_images(tmp_path, dataset)
    with pytest.raises(BadImageError, match=r"images/00000[2-6]\.jpg.*--on-bad-image skip"):
        prepare(ann, bad, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()
    assert not list((tmp_path / "out").glob("shards-*/*.parquet"))  # partial shards removed


def test_bad_images_skipped_and_counted_and_gt_round_trip(ray_local, dataset, tmp_path):
    ann, bad = _with_bad_images(tmp_path, dataset)
    out = tmp_path / "out"
    manifest = prepare(ann, bad, out, on_bad_image="skip")
    counts = manifest["counts"]
    assert counts["images_skipped"] == 5 and counts["images_written"] == 7
    assert counts["issues"] == {"missing": 1, "size_mismatch": 1, "undecodable": 3}
    skipped = {i["image_id"]: i for i in manifest["issues"]}
    assert set(skipped) == {2, 3, 4, 5, 6}
    assert "000002.jpg" in skipped[2]["reason"] and "50" in skipped[6]["reason"]

    # shards → COCO GT == source minus the skipped images (nothing else to repair in synthetic data)
    source = json.loads(Path(ann).read_text())
    gt = coco_gt_from_shards(str(out))
    assert [i["id"] for i in gt["images"]] == [i["id"] for i in source["images"] if i["id"] not in skipped]

    def key(a):
        return (a["image_id"], a["category_id"], tuple(round(float(v), 3) for v in a["bbox"]), a["iscrowd"])

    expected = sorted(key(a) for a in source["annotations"] if a["image_id"] not in skipped)
    assert sorted(key(a) for a in gt["annotations"]) == expected
    assert gt["categories"] == [{"id": c["id"], "name": c["name"]} for c in source["categories"]]


def test_rerun_refuses_then_overwrite_replaces_the_run(ray_local, dataset, tmp_path):
    ann, images = dataset
    out = tmp_path / "out"
    first = prepare(ann, images, out)
    with pytest.raises(DataError, match="already holds prepared data.*--overwrite"):
        prepare(ann, images, out)
    (out / "shards-stray").mkdir()  # an unlisted folder (a crashed run) must never be read
    (out / "shards-stray" / "x.parquet").write_bytes(b"junk")
    second = prepare(ann, images, out, overwrite=True)
    assert second["run_id"] != first["run_id"]
    assert not (out / f"shards-{first['run_id']}").exists()  # the old run's shards are gone
    assert load_manifest(str(out))["run_id"] == second["run_id"]
    assert len(coco_gt_from_shards(str(out))["images"]) == 12


def test_annotation_errors_stop_before_any_image_is_read(ray_local, dataset, tmp_path):
    ann, images = dataset
    d = json.loads(Path(ann).read_text())
    d["images"][0]["file_name"] = "../../etc/passwd"
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"ann\.json: image id 1: .*escapes the image root"):
        prepare(bad, images, tmp_path / "out")
    with pytest.raises(DataError, match="not found"):
        prepare(tmp_path / "nope.json", images, tmp_path / "out")


def _batches(blocks, collate, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    from pipelines.data.datasets import batches

    return list(batches(blocks, batch, collate))


def _decode_cfg(min_sizes: list[int], seed: int = 0):
    from types import SimpleNamespace

    from pipelines.config import load_config

    cfg = load_config(None, ["model.input.min_size=64", "model.input.max_size=160", f"train.seed={seed}"])
    return SimpleNamespace(model=cfg.model, train=cfg.train, data=SimpleNamespace(train_min_sizes=min_sizes,
                                                                                  flip_prob=0.5))  # fmt: skip


def test_a_rank_decodes_its_plan_in_order_and_the_same_way_every_run(ray_local, dataset, tmp_path):
    """Train: every image once per epoch, a new order per epoch, the plan's order exactly (decode tasks finish out
    of order; their outputs do not), the same pixels and boxes in two executions. Val: unaugmented, identical to the
    eval transform applied to the source image."""
    from pipelines.data.datasets import DecodeCpus, DecodeStream, train_decode, val_batches
    from pipelines.data.plan import Position, TrainPlan
    from pipelines.data.shards import shard_index

    ann, images = dataset
    out = tmp_path / "out"
    prepare(ann, images, out, rows_per_shard=4)
    index = shard_index(str(out))
    assert index.num_rows == 12 and [len(s.image_ids) for s in index.shards] == [4, 4, 4]
    collate = make_collate_fn()
    plan = TrainPlan(index, seed=0, batch=4)
    chunks = list(plan.chunks(0, 1, Position(), 9))  # 3 epochs of 3 steps
    expected = [index.shards[[s.path for s in index.shards].index(p)].image_ids[r] for c in chunks for p, rows in
                c.pieces for r in rows]  # fmt: skip
    stream = DecodeStream(chunks, train_decode(_decode_cfg([64, 96])), DecodeCpus(2))  # 2 tasks at a time, in order
    runs = [_batches(stream, collate) for _ in "ab"]
    ids = [i for b in runs[0] for i in b["image_ids"].tolist()]
    assert ids == expected
    epochs = [ids[k : k + 12] for k in range(0, 36, 12)]
    assert all(sorted(e) == list(range(1, 13)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
    for x, y in zip(*runs, strict=True):  # the same scale, flip and pixels: keyed by (seed, epoch, image)
        for k in x:
            torch.testing.assert_close(x[k], y[k])
    sizes = {tuple(s) for b in runs[0] for s in b["image_sizes"].tolist()}
    assert {min(s) for s in sizes} == {64, 96}  # multi-scale draws both sizes
    assert runs[0][0]["images"].shape[-1] % 128 == 0 and runs[0][0]["gt_labels"].dtype == torch.int64

    a = list(val_batches(index, SimpleInput(96, 160), 4, DecodeCpus(2)))
    assert [x["image_ids"].tolist() for x in a] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    # unaugmented: identical to the eval transform applied directly to the source image and JSON boxes
    source = json.loads(Path(ann).read_text())
    image = decode_image((images / "000001.jpg").read_bytes()).image
    boxes = np.array([a["bbox"] for a in source["annotations"] if a["image_id"] == 1 and not a["iscrowd"]], float)
    boxes[:, 2:] += boxes[:, :2]
    ref = EvalTransform(96, 160)(image, boxes, np.zeros(len(boxes)), 1)
    h, w = ref.image_size
    assert a[0]["image_sizes"][0].tolist() == [h, w]
    torch.testing.assert_close(a[0]["gt_boxes"][0, : len(boxes)], torch.from_numpy(ref.boxes))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected_px = (torch.from_numpy(ref.image.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(a[0]["images"][0, :, :h, :w], expected_px)


def test_a_shard_truncated_mid_run_is_an_error_naming_the_file(ray_local, dataset, tmp_path):
    """The plan was made from intact shards; one is cut short before its decode task reads it."""
    from pipelines.data.datasets import DecodeCpus, DecodeStream, train_decode
    from pipelines.data.plan import Position, TrainPlan
    from pipelines.data.shards import shard_index

    ann, images = dataset
    out = tmp_path / "out"
    prepare(ann, images, out, rows_per_shard=4)
    index = shard_index(str(out))
    victim = Path(index.shards[1].path)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    chunks = list(TrainPlan(index, seed=0, batch=4).chunks(0, 1, Position(), 3))
    with pytest.raises(Exception, match=rf"{re.escape(str(victim))}: cannot read shard") as info:
        for _ in DecodeStream(chunks, train_decode(_decode_cfg([64])), DecodeCpus(2)):
            pass
    assert isinstance(info.value, DataError) or "DataError" in str(info.value)  # Ray re-raises it as a subclass


class SimpleInput:
    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size
        self.size_divisible, self.image_mean, self.image_std = 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_read_rows_takes_rows_in_the_order_asked_from_only_their_row_groups(tmp_path):
    import pyarrow as pa

    from pipelines.data.shards import read_rows

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image_id": list(range(10)), "x": [str(i) for i in range(10)]}), path, row_group_size=3)
    assert read_rows(str(path), [7, 0, 9, 4], ["image_id"], None).column("image_id").to_pylist() == [7, 0, 9, 4]
    with pytest.raises(DataError, match="cannot read shard"):
        read_rows(str(tmp_path / "missing.parquet"), [0], ["image_id"], None)


def test_manifest_checks_and_shard_checks(ray_local, dataset, tmp_path):
    """One manifest reader: it refuses another format, names the folder; the run's label-map checks."""
    from pipelines.config import load_config
    from pipelines.data.shards import check_shards
    from retina.typed_config import ConfigError

    ann, images = dataset
    prepare(ann, images, tmp_path / "shards", rows_per_shard=4)
    cfg = load_config(None, [f"data.train_shards={tmp_path / 'shards'}", f"data.val_shards={tmp_path / 'shards'}",
                             "model.num_classes=5"])  # fmt: skip
    assert check_shards(cfg.data, 5).coco_ids == (1, 3, 7, 12, 90)
    with pytest.raises(ConfigError, match="model.num_classes: 80, but .* has 5 categories"):
        check_shards(cfg.data, 80)
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    (tmp_path / "shards" / MANIFEST).write_text(json.dumps({**manifest, "format": "retina-shards/0"}))
    with pytest.raises(DataError, match=r"format 'retina-shards/0', this version reads 'retina-shards/1'"):
        load_manifest(str(tmp_path / "shards"))
    prepare(ann, images, tmp_path / "shards", rows_per_shard=4, overwrite=True)  # another format is replaceable
    assert load_manifest(str(tmp_path / "shards"))["format"] == "retina-shards/1"
