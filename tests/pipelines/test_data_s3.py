"""S3 end to end against a real S3-compatible server (moto, 127.0.0.1): s3:// in, s3:// out, read back."""

from __future__ import annotations

import json

import pytest

from cluster import s3
from pipelines.data.datasets import Decode, DecodeCpus, DecodeStream, batches, make_collate_fn
from pipelines.data.plan import Position, TrainPlan
from pipelines.data.prepare import BadImageError, prepare
from pipelines.data.shards import MANIFEST, coco_gt_from_shards, load_manifest, shard_index
from retina.data.synthetic import generate
from retina.data.transforms import TrainAugment
from tests.s3_server import s3_server  # noqa: F401  (session fixture, found by name)

pytestmark = pytest.mark.slow


def test_prepare_from_s3_to_s3_then_train_batches(ray_local, s3_server, tmp_path):  # noqa: F811
    ann = generate(tmp_path, 10, seed=4)
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    name = s3.split_s3(bucket)[0]
    client.put_object(Bucket=name, Key="raw/annotations.json", Body=ann.read_bytes())
    for f in sorted((tmp_path / "images").iterdir()):
        client.put_object(Bucket=name, Key=f"raw/images/{f.name}", Body=f.read_bytes())
    client.delete_object(Bucket=name, Key="raw/images/000004.jpg")  # one missing object

    with pytest.raises(BadImageError, match=rf"s3://{name}/raw/images/000004\.jpg: missing"):
        prepare(f"{bucket}/raw/annotations.json", f"{bucket}/raw/images", f"{bucket}/prepared/train")

    out = f"{bucket}/prepared/train"
    manifest = prepare(f"{bucket}/raw/annotations.json", f"{bucket}/raw/images", out, on_bad_image="skip")
    assert manifest["counts"]["images_written"] == 9 and manifest["counts"]["issues"] == {"missing": 1}
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="prepared/train/")["Contents"]}
    assert f"prepared/train/{MANIFEST}" in keys
    assert {f"prepared/train/{s['path']}" for s in manifest["shards"]} <= keys
    assert load_manifest(out)["run_id"] == manifest["run_id"]

    source = json.loads(ann.read_text())
    gt = coco_gt_from_shards(out)
    assert len(gt["annotations"]) == sum(1 for a in source["annotations"] if a["image_id"] != 4)

    # a rank's plan decoded from s3:// (the tasks read only their rows, with the driver's S3 settings)
    index = shard_index(out)
    plan = TrainPlan(index, seed=1, batch=3)
    decode = Decode(TrainAugment([64], 128, 0.5), seed=1, s3_settings=s3.S3Settings.from_env())
    blocks = DecodeStream(list(plan.chunks(0, 1, Position(), plan.steps_per_epoch(1))), decode, DecodeCpus(2))
    ids = [i for b in batches(blocks, 3, make_collate_fn()) for i in b["image_ids"].tolist()]
    assert sorted(ids) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
