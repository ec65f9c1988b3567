"""Trained models in use: load one by URI (`loading`), run it on images (`detector`), over a folder with Ray Data
(`batch`, behind pipelines/predict.py) or over prepared shards with COCOeval (`evaluation`, behind
pipelines/evaluate.py). The registered model itself is an MLflow pyfunc model (`pyfunc_model`, logged as code),
which ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` (`serving`) run. All of them predict with the one
prediction core, `retina.inference`.

    from pipelines.inference import load_model
    detector = load_model("models:/retinanet-demo@champion")
    [dets] = detector.predict(["photo.jpg"])
"""

from pipelines.inference.detector import Detector, load_model
from pipelines.inference.loading import ModelLoadError, ModelSource, resolve_model

__all__ = ["Detector", "ModelLoadError", "ModelSource", "load_model", "resolve_model"]
