"""The registered model as MLflow runs it: `mlflow.pyfunc.load_model` in a fresh process with pickle
deserialisation off, and `mlflow models serve` over REST, each compared with `pipelines.inference.load_model`.

The model is logged and registered by the real `log_and_register` into a temporary SQLite store, untrained (a
smoke-config RetinaNet from its random initialisation, score threshold 0, so every image has detections to compare):
serving needs a registered model, not a good one, and this costs seconds instead of a training run. The model that
training registers goes through the same logging (tests/pipelines/test_predict.py loads and checks it).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow  # an MLflow store, a model server, fresh Python processes

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "retinanet-serve"
LABELS = [{"id": cid, "name": name, "label": i} for i, (cid, name) in enumerate([(1, "a"), (3, "b"), (7, "c"),
                                                                                 (12, "d"), (90, "e")])]  # fmt: skip


def _jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG with a few filled rectangles on grey: something for an untrained model to put boxes on."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (114, 114, 114))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        draw.rectangle((x, y, x + width // 3, y + height // 3), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    import torch
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.tracking.model_logging import log_and_register
    from pipelines.tracking.store import experiment_id
    from retina.model import build_retinanet
    from retina.typed_config import to_dict

    root = tmp_path_factory.mktemp("served")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    # the project's own experiment creation: its artifacts stay beside the database, in this temporary folder
    run_id = client.create_run(experiment_id(client, "serve")).info.run_id
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["model.postprocess.score_thresh=0.0"])
    torch.manual_seed(0)
    warnings = _Records(logging.WARNING)
    logging.getLogger("mlflow").addHandler(warnings)  # MLflow's loggers propagate up to "mlflow"
    try:
        logged = log_and_register(build_retinanet(cfg.model), label_map=LABELS, config=to_dict(cfg),
                                  tracking_uri=tracking_uri, run_id=run_id, registered_model_name=MODEL_NAME,
                                  alias="champion", alias_min_ap=0.5, val_ap=0.6)  # fmt: skip
    finally:
        logging.getLogger("mlflow").removeHandler(warnings)
    assert logged.alias_uri == f"models:/{MODEL_NAME}@champion"
    # MLflow ran the input example through the serving path while logging; it warns when that fails
    assert not warnings.messages, warnings.messages
    images = [_jpeg(160, 120, seed=1), _jpeg(90, 130, seed=2)]  # two sizes: the batch pads them together
    return SimpleNamespace(root=root, tracking_uri=tracking_uri, uri=logged.alias_uri, images=images)


def _reference(registered, images: list[bytes]) -> list[dict]:
    """What `load_model(...).predict` detects on `images`, one batch (as the pyfunc model batches them)."""
    from pipelines.inference import load_model

    return load_model(registered.uri, tracking_uri=registered.tracking_uri, device="cpu").predict(images)


def _assert_same(got: dict, want: dict) -> None:
    assert len(want["scores"]) > 0, "a score threshold of 0 must give detections to compare"
    np.testing.assert_allclose(np.asarray(got["boxes"], dtype=np.float32).reshape(-1, 4), want["boxes"], atol=1e-4)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    assert list(got["category_ids"]) == want["category_ids"].tolist()
    assert list(got["names"]) == list(want["names"])
    assert got["error"] == ""


# ------------------------------------------------------------------------------------------------ REST


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def server(registered):
    """`mlflow models serve` on 127.0.0.1 (a free port) in its own process group, stopped by that group."""
    from pipelines.inference import serving

    running = serving.start(registered.uri, registered.tracking_uri, registered.root / "serve.log", timeout_s=180)
    yield running
    serving.stop(running)
    deadline = time.monotonic() + 10  # uvicorn too: the whole group ends (a zombie is reaped by init shortly)
    while time.monotonic() < deadline:
        try:
            os.killpg(running.process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the server's process group {running.process.pid} is still there")


def test_served_model_answers_like_load_model(registered, server):
    images = registered.images
    want = _reference(registered, images)
    status, body = _post(server.port, {"dataframe_split": {"columns": ["image"], "data": [[_b64(i)] for i in images]}})
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == 2  # one row per image, in order
    for got, ref in zip(predictions, want, strict=True):
        assert set(got) == {"boxes", "scores", "labels", "category_ids", "names", "error"}
        _assert_same(got, ref)
    # the records orientation is the same request
    status, records = _post(server.port, {"dataframe_records": [{"image": _b64(i)} for i in images]})
    assert status == 200 and records == body


def test_served_model_names_bad_rows(registered, server):
    good, other = registered.images
    truncated = good[: len(good) // 3]
    # one good row among bad ones: its detections (it alone makes the batch), and the bad row's error
    rows = [[_b64(other)], [_b64(truncated)]]
    status, body = _post(server.port, {"dataframe_split": {"columns": ["image"], "data": rows}})
    assert status == 200, body
    ok, bad = body["predictions"]
    _assert_same(ok, _reference(registered, [other])[0])
    assert bad["error"].startswith("row 1: cannot decode image") and bad["boxes"] == [] and bad["scores"] == []

    # nothing decodable: HTTP 400 naming every row and its problem, no traceback
    rows = [[_b64(truncated)], [_b64(b"a text file, not an image")], [""]]
    status, body = _post(server.port, {"dataframe_split": {"columns": ["image"], "data": rows}})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    message = body["message"]
    assert "no image could be decoded" in message and "Traceback" not in message
    assert "row 0: cannot decode image" in message
    assert "row 1: not an image" in message
    assert "row 2: empty" in message


# ------------------------------------------------------------------------------------------------ pyfunc

_FRESH_PROCESS = """
import json, sys
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = [open(path, "rb").read() for path in sys.argv[2:]]
out = model.predict(pd.DataFrame({"image": images}))
import retina
plain = lambda v: v.tolist() if hasattr(v, "tolist") else v
print(json.dumps({
    "rows": [{k: plain(v) for k, v in row.items()} for row in out.to_dict("records")],
    "columns": list(out.columns),
    "pipelines_imported": any(m == "pipelines" or m.startswith("pipelines.") for m in sys.modules),
    "retina_from": retina.__file__,
}))
"""


def test_pyfunc_model_loads_without_pickle_in_a_fresh_process(registered, tmp_path):
    """`mlflow.pyfunc.load_model` with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, from another directory: the
    model's own code runs (the `retina` that travelled with it, no `pipelines`) and detects what load_model does."""
    import mlflow
    from mlflow.models import Model

    paths = []
    for i, data in enumerate(registered.images):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, registered.uri, *map(str, paths)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["boxes", "scores", "labels", "category_ids", "names", "error"]
    assert not out["pipelines_imported"], "the model must run on what travels with it"
    assert "/code/retina/" in out["retina_from"], out["retina_from"]
    for got, want in zip(out["rows"], _reference(registered, registered.images), strict=True):
        _assert_same(got, want)

    # and the model holds no pickle to refuse: models-from-code, a weights-only bundle, no other flavor
    mlflow.set_tracking_uri(registered.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered.uri, dst_path=str(tmp_path / "model")))
    flavors = Model.load(local).flavors
    assert set(flavors) == {"python_function"} and "model_code_path" in flavors["python_function"]
    assert "python_model" not in flavors["python_function"]  # the key of a cloudpickled PythonModel
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pth")]


def test_a_training_run_s_worse_model_does_not_take_the_alias(registered):
    """The one alias rule (pipelines/tracking/alias.py) holds for a training run's registration too."""
    import torch
    from mlflow.tracking import MlflowClient

    from pipelines import names
    from pipelines.config import load_config
    from pipelines.tracking.model_logging import log_and_register
    from retina.model import build_retinanet
    from retina.typed_config import to_dict

    client = MlflowClient(registered.tracking_uri)
    holder = str(client.get_model_version_by_alias(MODEL_NAME, "champion").version)
    run_id = client.create_run(client.get_experiment_by_name("serve").experiment_id).info.run_id
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    torch.manual_seed(1)
    worse = log_and_register(build_retinanet(cfg.model), label_map=LABELS, config=to_dict(cfg),
                             tracking_uri=registered.tracking_uri, run_id=run_id, registered_model_name=MODEL_NAME,
                             alias="champion", alias_min_ap=0.5, val_ap=0.55)  # fmt: skip
    assert worse.alias is None and worse.alias_uri is None and worse.champion.holder == holder
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == holder
    tags = client.get_run(run_id).data.tags
    assert tags[names.CHAMPION_TAG_PREFIX + "moved"] == "false" and "0.5500 <= champion's 0.6000" in tags[
        names.CHAMPION_TAG_PREFIX + "reason"]  # fmt: skip
