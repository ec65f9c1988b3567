"""pipelines/data/prepare.py (behind pipelines/prepare_data.py) and pipelines/data/datasets.py on real Ray: bad
images, re-runs, round trip, epochs, and the datasets training builds from its config."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.data.datasets import build_dataset, make_collate_fn
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


def _epoch_batches(ds, collate) -> list[dict[str, torch.Tensor]]:
    return list(ds.iter_torch_batches(batch_size=4, collate_fn=collate))


def test_train_reshuffles_every_epoch_val_is_deterministic_and_unaugmented(ray_local, dataset, tmp_path):
    ann, images = dataset
    out = tmp_path / "out"
    prepare(ann, images, out, rows_per_shard=4)
    collate = make_collate_fn()

    train = build_dataset(str(out), train=True, min_sizes=[64, 96], max_size=160, seed=0)
    epochs = [_epoch_batches(train, collate) for _ in range(3)]
    orders = [[i for b in e for i in b["image_ids"].tolist()] for e in epochs]
    assert all(sorted(o) == list(range(1, 13)) for o in orders)  # every image once per epoch
    assert len({tuple(o) for o in orders}) > 1  # a new order per epoch
    sizes = {tuple(s) for e in epochs for b in e for s in b["image_sizes"].tolist()}
    assert {min(s) for s in sizes} == {64, 96}  # multi-scale draws both sizes
    for e in epochs:
        b = e[0]
        assert b["images"].shape[-1] % 128 == 0 and b["gt_labels"].dtype == torch.int64

    # shuffle="files": no all-to-all stage, yet a new shard order and rows permuted inside each decode task
    files = build_dataset(str(out), train=True, min_sizes=[64], max_size=160, seed=0, shuffle="files", batch_size=4)
    assert "RandomShuffle" not in str(files) and "RandomizeBlockOrder" not in str(files)
    orders = [[i for b in _epoch_batches(files, collate) for i in b["image_ids"].tolist()] for _ in range(3)]
    assert all(sorted(o) == list(range(1, 13)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    in_shard_order = [sorted(o[k : k + 4]) == o[k : k + 4] for o in orders for k in range(0, 12, 4)]
    assert not all(in_shard_order)  # rows of a 4-row shard do not simply come out in their stored order

    val = build_dataset(str(out), train=False, min_sizes=[96], max_size=160)
    a, b = _epoch_batches(val, collate), _epoch_batches(val, collate)
    assert [x["image_ids"].tolist() for x in a] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    for x, y in zip(a, b, strict=True):
        for k in x:
            torch.testing.assert_close(x[k], y[k])
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
    expected = (torch.from_numpy(ref.image.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(a[0]["images"][0, :, :h, :w], expected)


def test_datasets_from_config_follow_the_run_config(ray_local, dataset, tmp_path):
    """The one builder training (and every search trial) uses: data.* decides the plan, train.seed the order."""
    from pipelines.config import load_config
    from pipelines.data.datasets import TRAIN_TASK_BATCHES, datasets_from_config
    from pipelines.data.shards import check_shards
    from retina.typed_config import ConfigError

    ann, images = dataset
    prepare(ann, images, tmp_path / "shards", rows_per_shard=4)
    common = [f"data.train_shards={tmp_path / 'shards'}", f"data.val_shards={tmp_path / 'shards'}",
              "model.num_classes=5", "model.input.min_size=64", "model.input.max_size=128"]  # fmt: skip
    for shuffle, stage in (("rows", "RandomShuffle"), ("files", None)):
        cfg = load_config(None, [*common, f"data.shuffle={shuffle}", "data.batch_size=8", "data.val_batch_size=3"])
        train, val = datasets_from_config(cfg)
        plan = str(train)
        assert ("RandomShuffle" in plan) == (stage is not None), plan
        # 4-row shards fit a decode task of 8 global batches: read straight into it, no repartition stage; val
        # decodes one batch of 3 rows per task, so its 4-row shards are split
        assert "num_rows_per_block" not in plan and 4 < 8 * TRAIN_TASK_BATCHES
        assert "num_rows_per_block=3" in str(val) and "RandomShuffle" not in str(val)
    # the label map a run checks its shards against (the sample categories, from the manifest)
    assert check_shards(cfg.data, 5).coco_ids == (1, 3, 7, 12, 90)
    with pytest.raises(ConfigError, match="model.num_classes: 80, but .* has 5 categories"):
        check_shards(cfg.data, 80)

    def first_epoch(*overrides: str) -> list[int]:
        cfg = load_config(None, [*common, "data.shuffle=files", "data.batch_size=4", "scaling.num_workers=1",
                                 *overrides])  # fmt: skip
        train, _ = datasets_from_config(cfg)
        return [i for b in _epoch_batches(train, make_collate_fn()) for i in b["image_ids"].tolist()]

    seed_0 = first_epoch("train.seed=0")
    assert sorted(seed_0) == list(range(1, 13))
    assert first_epoch("train.seed=0", "data.synthetic_seed=9") == seed_0  # train.seed alone decides the order
    assert first_epoch("train.seed=1") != seed_0

    # data.stream_epochs: one execution streams `passes` epochs, each a full pass in its own order
    cfg = load_config(None, [*common, "data.shuffle=files", "data.batch_size=4", "scaling.num_workers=1"])
    stream, _ = datasets_from_config(cfg, passes=3)
    ids = [i for b in _epoch_batches(stream, make_collate_fn()) for i in b["image_ids"].tolist()]
    # every image once per pass; decode tasks finish out of order, so rows near a pass boundary may cross it
    assert sorted(ids) == sorted(list(range(1, 13)) * 3)
    assert ids[:12] != ids[12:24] != ids[24:]  # a new order every pass
    off, _ = datasets_from_config(load_config(None, [*common, "data.shuffle=files", "data.stream_epochs=false"]), 3)
    rows, _ = datasets_from_config(load_config(None, [*common, "data.shuffle=rows"]), passes=3)
    assert off.count() == 12 and rows.count() == 12  # one pass per execution: streaming off, or an exact shuffle


def test_pass_order_is_every_shard_once_per_pass():
    from pipelines.data.shards import pass_order

    paths = [f"s{i}" for i in range(5)]
    order = pass_order(paths, 3, seed=7)
    assert [sorted(order[k * 5 : (k + 1) * 5]) for k in range(3)] == [paths] * 3
    assert order == pass_order(paths, 3, seed=7) and order != pass_order(paths, 3, seed=8)
    assert pass_order(paths, 2, None) == paths + paths
    with pytest.raises(ValueError, match="passes must be >= 1"):
        pass_order(paths, 0, None)
