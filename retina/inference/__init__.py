"""Images → detections: the one prediction core behind every way of running a trained model.

`pipelines.inference.load_model` (the `Detector`), the Ray Data batch job (pipelines/inference/batch.py) and the
MLflow pyfunc model that ``mlflow models serve`` runs (pipelines/inference/pyfunc_model.py) all go through the same
steps, so one image gets the same boxes whichever way it is sent:

- `images`: decode (EXIF, colour modes) → RGB uint8 → resize to the model's input size (`prepare`);
- `predictor`: collate (normalise, pad) → `RetinaNet.predict_batch` → boxes, scores, labels, COCO ids, names;
- `bundle`: a model as three plain files (weights-only state dict, config, label map) and back, without pickle.

Pure PyTorch + numpy + PIL, like the rest of `retina`: the package travels inside the logged MLflow model
(``code_paths``), so nothing here may import ray, mlflow or boto3.
"""
