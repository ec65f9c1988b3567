"""Model retrieval, batch inference and evaluation against a real trained model (real Ray, MLflow, S3 server).

One smoke model is trained per module (module-scoped fixture, tmp MLflow SQLite store and storage path) and
reused by every test. Its postprocess score threshold is 0 so that even a 4-step model yields detections and a
non-zero AP: the evaluation test then compares a real number, not 0 == 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipelines import names
from pipelines.training.checkpoint import STATE_FILE
from tests.s3_server import s3_server  # noqa: F401  (pytest finds the fixture by name)

pytestmark = pytest.mark.slow  # trains a model on the session's Ray; some tests start the S3 server

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IDS = {1, 3, 7, 12, 90}  # the synthetic data's (non-contiguous) COCO category ids
MODEL_NAME = "retinanet-smoke"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.training.run import run_training

    root = tmp_path_factory.mktemp("trained")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    # Created here so its artifacts land in tmp, not in ./mlruns of whatever directory pytest runs in.
    MlflowClient(tracking_uri).create_experiment("retina-smoke", artifact_location=str(root / "artifacts"))
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.root={root / 'data'}",
            f"data.train_shards={root / 'data' / 'shards' / 'train'}",
            f"data.val_shards={root / 'data' / 'shards' / 'val'}",
            f"run.storage_path={root / 'runs'}",
            f"tracking.tracking_uri={tracking_uri}",
            "train.max_steps=4",  # one epoch: one evaluation, one checkpoint
            "train.num_logged_images=0",
            "model.postprocess.score_thresh=0.0",
            # After 4 steps the model is barely trained: with up to 1000 boxes per image some of them always
            # overlap an object of the right class, so its AP is above 0 and the AP comparison below means
            # something (with 100 boxes per image it was sometimes exactly 0).
            "model.postprocess.detections_per_img=1000",
            "tracking.alias_min_ap=1e-6",  # earned with any AP above 0: the gate must read the checkpoint's AP
        ],
    )
    outcome = run_training(cfg)
    assert outcome.model is not None and outcome.model.alias_uri == f"models:/{MODEL_NAME}@smoke"
    version = MlflowClient(tracking_uri).get_model_version(MODEL_NAME, outcome.model.version)
    assert float(version.tags[names.VERSION_VAL_AP_TAG]) == pytest.approx(outcome.metrics[names.VAL_AP], abs=1e-4)

    images = root / "images"  # the val images, one in a sub-folder, plus two unreadable files
    shutil.copytree(root / "data" / "val" / "images", images)
    first = sorted(images.glob("*.jpg"))[0]
    (images / "sub").mkdir()
    first.rename(images / "sub" / first.name)
    (images / "corrupt.jpg").write_bytes(os.urandom(2048))
    (images / "truncated.jpg").write_bytes((images / "sub" / first.name).read_bytes()[:600])
    (images / "notes.txt").write_text("not an image, not listed")
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        outcome=outcome,
        tracking_uri=tracking_uri,
        images=images,
        val_shards=str(root / "data" / "shards" / "val"),
        annotations=json.loads((root / "data" / "val" / "annotations.json").read_text()),
    )


def _gt_for(images_json: dict, annotations: dict) -> dict:
    """The sample annotations re-keyed to predict.py's image ids (matched by file name)."""
    ids = {Path(img["file_name"]).name: img["id"] for img in images_json["images"]}
    old = {img["id"]: Path(img["file_name"]).name for img in annotations["images"]}
    anns = [{**a, "image_id": ids[old[a["image_id"]]]} for a in annotations["annotations"]]
    return {"images": images_json["images"], "annotations": anns, "categories": annotations["categories"]}


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def test_predict_cli_by_alias_in_fresh_process(trained, tmp_path, ray_local):
    out = tmp_path / "out"
    # A fresh Python process (nothing cached from training), joining the session's Ray instead of starting one.
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri,
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "predict.py"), "--model", f"models:/{MODEL_NAME}@smoke",
         "--images", str(trained.images), "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted 8 of 10 images" in proc.stdout and "2 skipped" in proc.stdout, proc.stdout

    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["file_name"] for s in skipped] == ["corrupt.jpg", "truncated.jpg"]
    assert all("corrupt.jpg" in s["error"] or "truncated.jpg" in s["error"] for s in skipped)
    images_json = json.loads((out / "images.json").read_text())
    names = [img["file_name"] for img in images_json["images"]]
    assert len(names) == 8 and any(n.startswith("sub/") for n in names)
    assert [img["id"] for img in images_json["images"]] == sorted({img["id"] for img in images_json["images"]})
    assert {c["id"] for c in images_json["categories"]} == SAMPLE_IDS

    detections = json.loads((out / "detections.json").read_text())
    assert detections, "a score threshold of 0 must give detections"
    assert {d["category_id"] for d in detections} <= SAMPLE_IDS
    assert {d["category_id"] for d in detections} & {7, 12, 90}, "ids must be COCO ids, not contiguous labels"
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"} and len(d["bbox"]) == 4
        assert d["bbox"][2] >= 0 and d["bbox"][3] >= 0
    gt = _coco(_gt_for(images_json, trained.annotations))
    results = gt.loadRes(detections)  # pycocotools accepts the file as COCO results
    assert len(results.getAnnIds()) == len(detections)
    size = {img["id"]: (img["width"], img["height"]) for img in images_json["images"]}
    for d in detections:  # boxes in original-image pixels
        x, y, w, h = d["bbox"]
        assert x >= -1e-3 and y >= -1e-3 and x + w <= size[d["image_id"]][0] + 1e-3
        assert y + h <= size[d["image_id"]][1] + 1e-3


def test_threshold_render_and_same_detections_as_notebook_api(trained, tmp_path):
    from pipelines.inference import load_model
    from pipelines.inference.batch import predict

    version_uri = f"models:/{MODEL_NAME}/{trained.outcome.model.version}"
    detector = load_model(version_uri, tracking_uri=trained.tracking_uri)
    files = sorted(p for p in trained.images.rglob("*.jpg") if p.name not in ("corrupt.jpg", "truncated.jpg"))
    reference = detector.predict([str(f) for f in files], batch_size=1)
    scores = np.concatenate([r["scores"] for r in reference])
    threshold = float(np.quantile(scores, 0.9))

    out = tmp_path / "out"
    summary = predict(version_uri, str(trained.images), str(out), score_threshold=threshold, render=True,
                      batch_size=1, tracking_uri=trained.tracking_uri)  # fmt: skip
    assert summary.num_images == 8 and len(summary.skipped) == 2
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all(d["score"] > threshold for d in detections)
    expected = sum(int((r["scores"] > threshold).sum()) for r in reference)
    assert len(detections) == expected == summary.num_detections

    # same model, same preprocessing, batch of 1 in both: the batch job equals the notebook API
    ids = {img["file_name"]: img["id"] for img in json.loads((out / "images.json").read_text())["images"]}
    for f, ref in zip(files, reference, strict=True):
        mine = [d for d in detections if d["image_id"] == ids[f.relative_to(trained.images).as_posix()]]
        keep = ref["scores"] > threshold
        assert [d["category_id"] for d in mine] == ref["category_ids"][keep].tolist()
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        np.testing.assert_allclose(xyxy, ref["boxes"][keep], atol=1e-3)

    rendered = sorted((out / "rendered").rglob("*.jpg"))
    assert [r.relative_to(out / "rendered") for r in rendered] == [f.relative_to(trained.images) for f in files]
    with Image.open(rendered[-1]) as img, Image.open(files[-1]) as src:
        assert img.size == src.size and np.asarray(img).shape == np.asarray(src).shape


@pytest.mark.parametrize("kind", ["alias", "version", "model_id", "run", "checkpoint"])
def test_every_uri_kind_loads_the_same_model(trained, kind):
    from pipelines.inference import load_model

    uris = {
        "alias": f"models:/{MODEL_NAME}@smoke",
        "version": f"models:/{MODEL_NAME}/{trained.outcome.model.version}",
        "model_id": trained.outcome.model.model_uri,  # models:/<model_id>
        "run": f"runs:/{trained.outcome.mlflow_run_id}/model",
        "checkpoint": trained.outcome.best_checkpoint,
    }
    image = sorted(trained.images.glob("*.jpg"))[0]
    detector = load_model(uris[kind], tracking_uri=trained.tracking_uri)
    assert list(detector.label_map.coco_ids) == sorted(SAMPLE_IDS)
    [det] = detector.predict(Image.open(image))
    [ref] = load_model(uris["checkpoint"]).predict(np.asarray(Image.open(image).convert("RGB")))
    np.testing.assert_allclose(det["boxes"], ref["boxes"], atol=1e-4)
    np.testing.assert_array_equal(det["category_ids"], ref["category_ids"])
    assert set(det) == {"boxes", "scores", "labels", "category_ids", "names"}


@pytest.mark.parametrize(
    "uri",
    ["models:/retinanet-smoke@no-such-alias", "models:/no-such-model/1", "models:/m-0123456789abcdef0123456789abcdef",
     "runs:/0123456789abcdef/model", "/no/such/checkpoint", "ftp://host/model"],
)  # fmt: skip
def test_bad_uri_is_a_clear_error_naming_it(trained, uri):
    from pipelines.inference import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match=re.escape(repr(uri))):
        load_model(uri, tracking_uri=trained.tracking_uri)


def test_evaluate_reproduces_training_val_ap_and_links_the_model(trained):
    from mlflow.tracking import MlflowClient

    from pipelines.inference.evaluation import evaluate_model
    from pipelines.tracking.store import metric_history

    history = metric_history(trained.tracking_uri, trained.outcome.mlflow_run_id, names.VAL_AP)
    trained_ap = max(v for _, v in history)  # the registered model is the best checkpoint by val/AP
    assert trained_ap > 0, "the fixture's model must score above 0 for this comparison to mean anything"

    evaluation = evaluate_model(f"models:/{MODEL_NAME}@smoke", trained.val_shards, tracking_uri=trained.tracking_uri)
    assert evaluation.num_images == 8
    assert evaluation.metrics["AP"] == pytest.approx(trained_ap, abs=1e-6)

    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(evaluation.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/AP"] == pytest.approx(evaluation.metrics["AP"], abs=1e-12)
    assert evaluation.per_class and {c["id"] for c in evaluation.per_class} <= SAMPLE_IDS
    for c in evaluation.per_class:  # per category, as logged and as in the printed table
        assert run.data.metrics[f"eval/class_AP/{c['name']}"] == pytest.approx(c["AP"], abs=1e-12)
    assert run.data.metrics["eval/agnostic_AP"] == pytest.approx(evaluation.agnostic["AP"], abs=1e-12)
    assert {a.path for a in client.list_artifacts(evaluation.run_id, "evaluation")} == {
        "evaluation/report.json", "evaluation/cocoeval.txt"
    }  # fmt: skip
    version = client.get_model_version(MODEL_NAME, trained.outcome.model.version)
    assert float(version.tags["eval/AP"]) == pytest.approx(evaluation.metrics["AP"], abs=1e-12)
    assert version.tags["eval/run_id"] == evaluation.run_id
    model_id = trained.outcome.model.model_uri.split("/")[-1]
    logged = {m.key: m.value for m in client.get_logged_model(model_id).metrics or []}
    assert logged["eval/AP"] == pytest.approx(evaluation.metrics["AP"], abs=1e-12)


def test_predict_s3_to_s3_with_s3_checkpoint(trained, s3_server, tmp_path):  # noqa: F811
    from cluster import s3
    from pipelines.inference.batch import predict

    bucket = s3_server.new_bucket("predict")
    checkpoint = f"{bucket}/checkpoints/best"
    s3.write_bytes(f"{checkpoint}/{STATE_FILE}", (Path(trained.outcome.best_checkpoint) / STATE_FILE).read_bytes())
    files = [*sorted(trained.images.glob("0*.jpg"))[:2], trained.images / "corrupt.jpg"]
    for f in files:
        s3.write_bytes(f"{bucket}/in/{f.name}", f.read_bytes())

    summary = predict(checkpoint, f"{bucket}/in", f"{bucket}/out", render=True, batch_size=2)
    assert summary.num_images == 2 and [s["file_name"] for s in summary.skipped] == ["corrupt.jpg"]
    written = sorted(s3.list_files(f"{bucket}/out"))
    assert {f"{bucket}/out/{n}" for n in ("detections.json", "images.json", "skipped.json", "summary.json")} <= set(
        written
    )
    assert sum("/out/rendered/" in w for w in written) == 2
    detections = json.loads(s3.read_bytes(f"{bucket}/out/detections.json"))
    assert len(detections) == summary.num_detections > 0
    assert {d["category_id"] for d in detections} <= SAMPLE_IDS


def test_cli_help_and_bad_uri_exit_code(trained, tmp_path, capsys):
    from pipelines import evaluate, predict

    for module in (predict, evaluate):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out
    # `python pipelines/evaluate.py` from another directory (predict.py's is covered above): a bad URI is exit 2
    # with the URI in the message, before any Ray work starts
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model", "models:/no-such-model@x",
         "--data", trained.val_shards, "--no-log"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "evaluate: error: " in proc.stderr, proc.stderr
    assert "models:/no-such-model@x" in proc.stderr, proc.stderr


def test_loss_analysis_of_the_trained_model_on_the_val_shards(trained):
    """The paper's Figure 4 through evaluate's val pipeline: on the trained model, the hardest 5 % of the negative
    anchors carry a larger share of the loss at γ = 2 than at γ = 0 (cross entropy)."""
    from pipelines.inference.evaluation import evaluate_model, format_table

    evaluation = evaluate_model(f"models:/{MODEL_NAME}@smoke", trained.val_shards, tracking_uri=trained.tracking_uri,
                                log=False, loss_gammas=(0.0, 2.0))  # fmt: skip
    result = evaluation.loss_analysis
    assert evaluation.run_id is None and [g.gamma for g in result.per_gamma] == [0.0, 2.0]
    ce, focal = result.gamma(0.0), result.gamma(2.0)
    assert ce.negative.count == focal.negative.count > 1000 and ce.positive.count > 0  # every val anchor, once
    assert focal.negative.hardest_share[0.05] > ce.negative.hardest_share[0.05], (ce.negative, focal.negative)
    assert result.alpha == trained.cfg.model.loss.alpha  # the model's own α
    assert "Loss concentration" in format_table(evaluation)  # printed after the AP table


_FRESH_PROCESS = """
import json, sys
import mlflow.pyfunc
import pandas as pd
from pipelines.inference import load_model
plain = lambda d: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in d.items()}
detector = load_model(sys.argv[1])
frame = pd.DataFrame({"image": [open(path, "rb").read() for path in sys.argv[2:]]})
pyfunc = mlflow.pyfunc.load_model(sys.argv[1]).predict(frame)
print(json.dumps({"load_model": [plain(d) for d in detector.predict(sys.argv[2:])],
                  "pyfunc": [plain(r) for r in pyfunc.to_dict("records")]}))
"""


def test_registered_model_loads_without_unpickling_and_matches_the_checkpoint(trained, tmp_path):
    """In a fresh process with MLflow's pickle deserialisation off, the registered model loads both ways (load_model
    and MLflow's pyfunc, each rebuilt from its weights-only state dict and config) and detects exactly what its
    checkpoint detects."""
    from pipelines.inference import load_model

    images = sorted(str(p) for p in (trained.root / "data" / "val" / "images").glob("*.jpg"))[:3]
    expected = load_model(trained.outcome.best_checkpoint).predict(images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, f"models:/{MODEL_NAME}@smoke", *images],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for way in ("load_model", "pyfunc"):
        assert len(out[way]) == len(expected), way
        for got, want in zip(out[way], expected, strict=True):
            assert got["names"] == list(want["names"]) and got["category_ids"] == want["category_ids"].tolist()
            np.testing.assert_allclose(np.reshape(got["boxes"], (-1, 4)), want["boxes"], atol=1e-3)
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)


def test_logged_model_signature_and_input_example_describe_the_pyfunc_call(trained, tmp_path):
    """The registered model's MLmodel carries a batch-first signature and an input example, and they describe what
    `mlflow.pyfunc.load_model(uri).predict` takes and returns: a DataFrame with a binary column of encoded images
    in, one row of detections per image out (the logged output schema is what MLflow infers from a real answer).
    The description says how to load it with pyfunc, serve it and load it with load_model."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model, infer_signature
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import ColSpec, Schema

    uri = f"models:/{MODEL_NAME}/{trained.outcome.model.version}"
    mlflow.set_tracking_uri(trained.tracking_uri)
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs == Schema([ColSpec("binary", "image")])
    assert info.saved_input_example_info["type"] == "dataframe"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path))
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"] and isinstance(example["image"].iloc[0], bytes)

    model = mlflow.pyfunc.load_model(local)
    from_example = model.predict(example)
    assert list(from_example.columns) == info.signature.outputs.input_names() and len(from_example) == 1
    images = [p.read_bytes() for p in sorted(trained.images.glob("*.jpg"))[:2]]
    answer = model.predict(pd.DataFrame({"image": images}))
    assert all(len(s) > 0 for s in answer["scores"])  # a score threshold of 0: the schema is inferred from detections
    assert infer_signature(example, answer).outputs == info.signature.outputs

    description = MlflowClient(trained.tracking_uri).get_model_version(MODEL_NAME, trained.outcome.model.version)
    for usage in (f"mlflow.pyfunc.load_model('{uri}')", f"mlflow models serve -m {uri}", f"load_model('{uri}')"):
        assert usage in description.description, usage
