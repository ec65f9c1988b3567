"""The registered model over REST (``mlflow models serve``) against the same model in-process (``load_model``).

    python benchmarks/serving.py [--model models:/retinanet-demo@champion] [--tracking-uri sqlite:///mlflow.db]
                                 [--images data/sample/val/images] [--requests 30] [--batch 8] [--threads N]

Needs a registered model in the new pyfunc format (``make demo`` registers ``retinanet-demo``; without the model
this prints one line and exits 0, so ``make bench`` runs on a fresh clone). The alias is pinned to its version
first, so both sides run the same model. The server is ``mlflow models serve --env-manager local`` on 127.0.0.1
(pipelines/inference/serving.py), started here and stopped at the end.

Both sides get the same encoded JPEGs from --images and do the same work per request: decode, resize, one forward
pass per batch, detections (`retina.inference`). A request is one image, then --batch images (one forward pass:
the pyfunc model batches 8 at a time, so --batch 8 is one pass on each side). Calls alternate between the two
sides, so load from other processes on the machine falls on both alike. The server's latency is the client's:
the JSON request (base64 images, encoded once beforehand) sent, the answer received and parsed. Printed per case:
p50 and p95 latency in ms, images/s (images over the summed latencies) and the server's p50 over in-process p50.
Torch uses its default threads on both sides (one per core), or --threads on both. On a machine other processes
keep busy, use --threads 1: two 2-thread processes on 2 cores stall at each parallel region's barrier whenever a
thread is descheduled, which measured seconds per request on one side at a load average of 7-27.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _request(images: list[bytes]) -> bytes:
    rows = [[base64.b64encode(image).decode("ascii")] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def _line(label: str, seconds: list[float], images: int, ratio: float | None = None) -> str:
    ms = np.asarray(seconds) * 1000.0
    rate = images * len(seconds) / float(np.sum(seconds))
    p50, p95 = np.percentile(ms, 50), np.percentile(ms, 95)
    text = f"  {label:<32} p50 {p50:8.1f} ms   p95 {p95:8.1f} ms   {rate:7.2f} images/s"
    return text + (f"   server/in-process p50 {ratio:.2f}x" if ratio is not None else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/retinanet-demo@champion")
    parser.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--images", default=str(REPO / "data" / "sample" / "val" / "images"))
    parser.add_argument("--requests", type=int, default=30, help="timed requests per case and side")
    parser.add_argument("--batch", type=int, default=8, help="images in a batch request")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per case and side first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (default: torch's)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the server gets OMP_NUM_THREADS, which torch reads at its start

    from pipelines.inference import ModelLoadError, load_model, resolve_model, serving
    from pipelines.tracking.store import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        source = resolve_model(args.model, tracking_uri)
    except ModelLoadError as exc:
        print(f"serving: no model to serve ({exc}); run `make demo` first")
        return 0
    files = sorted(Path(args.images).glob("*.jpg"))[: args.batch]
    if not files:
        print(f"serving: no .jpg images in {args.images}", file=sys.stderr)
        return 2
    images = [f.read_bytes() for f in files]
    batch = [images[i % len(images)] for i in range(args.batch)]  # repeated when the folder holds fewer
    cases = {"1 image": [images[0]], f"batch of {args.batch}": batch}

    detector = load_model(source, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        server = serving.start(source.load_uri, tracking_uri, Path(tmp) / "serve.log", env=threads)
        try:
            print(f"serving {source.describe()}: {detector.cfg.backbone.name} at {detector.cfg.input.min_size} px, "
                  f"CPU, torch threads {torch.get_num_threads()}; server up {server.started_s:.1f} s after its "
                  f"command; {args.requests} timed requests per case and side")  # fmt: skip
            for label, case in cases.items():
                body = _request(case)
                for _ in range(args.warmup):
                    detector.predict(case)
                    _post(server.url, body)
                local, remote = [], []
                for _ in range(args.requests):  # alternating: the machine's other load falls on both sides alike
                    began = time.perf_counter()
                    detector.predict(case)
                    local.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    answer = _post(server.url, body)
                    remote.append(time.perf_counter() - began)
                assert len(answer["predictions"]) == len(case) and not any(p["error"] for p in answer["predictions"])
                ratio = float(np.median(remote) / np.median(local))
                print(f" {label} ({len(body) / 1024:.0f} KiB request):")
                print(_line("in-process load_model().predict", local, len(case)))
                print(_line("mlflow models serve, POST", remote, len(case), ratio))
        finally:
            serving.stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
