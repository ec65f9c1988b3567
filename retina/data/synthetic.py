"""Synthetic COCO-format datasets: filled shapes on a textured background, in two profiles.

``python -m retina.data.synthetic --output DIR --num-images N [--seed S] [--profile sample|coco] [--workers W]``
writes ``DIR/images/*.jpg`` and ``DIR/annotations.json`` (``file_name`` is relative to ``DIR/images``).

Profiles (`PROFILES`):
- ``sample`` (the smoke/demo data, everything below): 192-320 px images, 5 classes, 1-8 objects, learnable on
  CPU in minutes;
- ``coco``: COCO's shape for measuring costs at scale (docs/benchmarks.md), not for learning: 640 px on the
  longer side and 360-480 on the shorter (COCO's typical 640x480/640x427; a quarter portrait), COCO's 80
  category ids (1..90 with its gaps), Zipf-like class frequencies (the first class ~18% of objects, as
  "person" is in COCO's), a geometric object count with mean ~7.3 per image capped at 40 (COCO train2017:
  7.3 annotations per image, a long tail), object sizes log-uniform from 8 px to 60% of the shorter side
  (~40% small, ~30% medium, ~30% large by COCO's area ranges; COCO: 41 / 34 / 24), ~1% empty images.
  Its classes are shapes (class id mod 5) in random colours: 80 classes are not visually separable, which costs
  nothing in a cost measurement.

Why it looks the way it does:
- five shape classes with imbalanced frequencies and NON-contiguous COCO ids (1, 3, 7, 12, 90), so the
  id ↔ contiguous-label map and the focal loss's handling of rare classes are both exercised;
- colours are random (the class is the shape, not the colour) but always contrast with the local background,
  so a small detector trained from scratch on CPU can learn the task in minutes;
- sizes are log-uniform from 10 px to 60% of the shorter side, so COCO's small/medium/large ranges all occur;
- about 10% of the images have no object (pure negatives), some carry an ``iscrowd=1`` group of tiny circles;
- every box is the exact tight box of the pixels the object covers in the final image (drawn mask minus what
  later objects hide), in COCO xywh with integer pixel edges; ``area`` is the box area (w * h), which is also
  what the shard → COCO round trip can rebuild, so evaluation from the JSON and from the shards agree.

Deterministic: each image draws from its own ``np.random.default_rng((seed, index))``, the JSON is written
with sorted keys and no timestamps, so the same seed gives byte-identical annotations and identical JPEGs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (COCO id, name, frequency): ids deliberately non-contiguous; frequencies imbalanced (sum to 1).
CATEGORIES: tuple[tuple[int, str, float], ...] = (
    (1, "circle", 0.40),
    (3, "square", 0.25),
    (7, "triangle", 0.17),
    (12, "cross", 0.11),
    (90, "star", 0.07),
)
SHAPES = tuple(name for _, name, _ in CATEGORIES)
CROWD_CATEGORY_ID = 1  # crowd groups are made of tiny circles

MIN_SIDE, MAX_SIDE = 192, 320  # image height and width, drawn independently
MIN_OBJECT = 10.0  # px, smallest object extent
MAX_OBJECT_FRACTION = 0.6  # of the shorter image side
MAX_OBJECTS = 8
EMPTY_FRACTION = 0.10
CROWD_FRACTION = 0.08
MAX_OVERLAP = 0.2  # intersection / smaller box area allowed between two objects (keeps >= ~80% visible)
JPEG_QUALITY = 92

# COCO's 80 category ids: 1..90 without the 10 ids its 2014 paper listed but never annotated.
COCO_IDS = tuple(i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83})


@dataclass(frozen=True)
class Profile:
    """What a generated dataset looks like (see the module docstring for the two profiles)."""

    name: str
    categories: tuple[tuple[int, str, float], ...]  # (COCO id, name, frequency); a name starts with its shape
    sides: tuple[int, int] | None  # (min, max) of height and width drawn independently, or None: landscape 640
    mean_objects: float | None  # None: uniform 1..MAX_OBJECTS; else geometric with this mean, capped
    max_objects: int
    min_object: float
    empty_fraction: float
    crowd_fraction: float


def _coco_categories() -> tuple[tuple[int, str, float], ...]:
    weights = [1.0 / (k + 1) ** 0.8 for k in range(len(COCO_IDS))]  # Zipf-like: a few classes dominate
    total = sum(weights)
    pairs = enumerate(zip(COCO_IDS, weights, strict=True))
    return tuple((cid, f"{SHAPES[k % 5]}_{cid}", w / total) for k, (cid, w) in pairs)


SAMPLE = Profile("sample", CATEGORIES, (MIN_SIDE, MAX_SIDE), None, MAX_OBJECTS, MIN_OBJECT, EMPTY_FRACTION,
                 CROWD_FRACTION)  # fmt: skip
COCO = Profile("coco", _coco_categories(), None, 7.3, 40, 8.0, 0.01, 0.01)
PROFILES = {p.name: p for p in (SAMPLE, COCO)}


@dataclass
class _Object:
    category_id: int
    mask: np.ndarray  # (h, w) bool, the shape's pixels inside its patch
    top: int  # patch position in the image
    left: int
    crowd: bool = False


def _unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (P, 2) of the shape in a unit frame centred on 0 (extent about [-1, 1])."""
    if name == "circle":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if name == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "cross":
        a = rng.uniform(0.28, 0.4)  # half arm width
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a)]
        pts.append((-a, -a))
        return np.array(pts, dtype=float)
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    raise ValueError(f"unknown shape {name!r}")


# How far each class may rotate: squares stay square-ish (a 45° square reads as a diamond), crosses likewise.
_MAX_ROTATION = {"circle": 0.0, "square": 20.0, "triangle": 180.0, "cross": 15.0, "star": 180.0}


def _shape_mask(name: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Rasterise one shape: (h, w) bool mask whose tight box has the longer side ≈ `extent` px."""
    pts = _unit_polygon(name, rng)
    angle = math.radians(rng.uniform(-_MAX_ROTATION[name], _MAX_ROTATION[name]))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T
    aspect = math.exp(rng.uniform(-0.25, 0.25))  # mild stretch: not every object is square
    pts = pts * np.array([aspect, 1 / aspect])
    pts = pts - pts.min(0)
    pts = pts * ((extent - 1) / pts.max())  # longer side spans `extent` pixels
    h, w = int(math.ceil(pts[:, 1].max())) + 1, int(math.ceil(pts[:, 0].max())) + 1
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(canvas) > 0


def _crowd_mask(rng: np.random.Generator, extent: float) -> np.ndarray:
    """A cluster of 6-12 tiny circles (radius 2-4 px) in an `extent`-sized patch: one iscrowd=1 region."""
    size = int(extent)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 13))):
        r = float(rng.uniform(2, 4))
        cx, cy = rng.uniform(r, size - r - 1, size=2)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float: a low-saturation base colour, a smooth random texture and a gradient."""
    base = rng.uniform(40, 215)
    tint = rng.uniform(-20, 20, size=3)
    coarse = rng.normal(0, 18, size=(4, 4, 3)).astype(np.float32)
    # Bilinear upsampling of a 4x4 grid gives a smooth blotchy texture at almost no cost.
    texture = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((w, h), Image.BILINEAR)) for c in range(3)], -1
    )
    gx = (np.arange(w, dtype=np.float32) / w - 0.5) * np.float32(rng.uniform(-30, 30))
    gy = (np.arange(h, dtype=np.float32) / h - 0.5) * np.float32(rng.uniform(-30, 30))
    return texture + (gy[:, None, None] + gx[None, :, None] + (base + tint).astype(np.float32))


def _contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A random RGB colour at least 110 (L1 over channels) away from the background under the object."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - bg_mean).sum() >= 110:
            return colour
    return np.where(bg_mean > 127, 0.0, 255.0)  # fallback: black or white against the background


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    for ox1, oy1, ox2, oy2 in others:
        iw, ih = min(x2, ox2) - max(x1, ox1), min(y2, oy2) - max(y1, oy1)
        if iw > 0 and ih > 0:
            smaller = min((x2 - x1) * (y2 - y1), (ox2 - ox1) * (oy2 - oy1))
            if iw * ih > MAX_OVERLAP * smaller:
                return True
    return False


def _draw_objects(rng: np.random.Generator, h: int, w: int, profile: Profile) -> list[_Object]:
    """The unplaced objects of one image: maybe a crowd group, then a number of shapes of random classes."""
    shapes = {cid: name.split("_")[0] for cid, name, _ in profile.categories}
    ids = np.array([cid for cid, _, _ in profile.categories])
    probs = np.array([p for _, _, p in profile.categories])
    objects: list[_Object] = []
    if profile.mean_objects is None:
        wanted = int(rng.integers(1, profile.max_objects + 1))
    else:
        wanted = min(int(rng.geometric(1.0 / profile.mean_objects)), profile.max_objects)
    if rng.random() < profile.crowd_fraction:
        crowd_id = int(ids[0])  # the most frequent class (circles in both profiles)
        objects.append(_Object(crowd_id, _crowd_mask(rng, rng.uniform(30, 60)), 0, 0, crowd=True))
    for _ in range(wanted):
        cid = int(rng.choice(ids, p=probs))
        max_extent = MAX_OBJECT_FRACTION * min(h, w)
        extent = math.exp(rng.uniform(math.log(profile.min_object), math.log(max_extent)))
        objects.append(_Object(cid, _shape_mask(shapes[cid], extent, rng), 0, 0))
    return objects


def _place_objects(rng: np.random.Generator, objects: list[_Object], h: int, w: int) -> list[_Object]:
    """Give each object a position that overlaps the others at most MAX_OVERLAP; return them in depth order."""
    # Place large objects first so that small ones fill the gaps; drop what does not fit after 30 tries.
    objects.sort(key=lambda o: -o.mask.size)
    placed: list[tuple[int, int, int, int]] = []
    kept = []
    for obj in objects:
        mh, mw = obj.mask.shape
        for _ in range(30):
            top, left = int(rng.integers(0, h - mh + 1)), int(rng.integers(0, w - mw + 1))
            box = (left, top, left + mw, top + mh)
            if not _overlaps(box, placed):
                obj.top, obj.left = top, left
                placed.append(box)
                kept.append(obj)
                break
    # Draw in random depth order: which object hides which is not tied to size.
    return [kept[i] for i in rng.permutation(len(kept))]


def _paint(rng: np.random.Generator, objects: list[_Object], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Background + objects + noise → (uint8 pixels, owner map: index of the object visible per pixel or -1)."""
    image = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int32)  # index of the object visible at each pixel, -1 background
    for i, obj in enumerate(objects):
        mh, mw = obj.mask.shape
        region = (slice(obj.top, obj.top + mh), slice(obj.left, obj.left + mw))
        bg_mean = image[region][obj.mask].mean(0)
        image[region][obj.mask] = _contrasting_colour(rng, bg_mean)
        owner[region][obj.mask] = i
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * 6  # sensor-like noise, objects included
    return np.clip(image, 0, 255).astype(np.uint8), owner


def _visible_annotations(objects: list[_Object], owner: np.ndarray) -> list[dict]:
    """The tight box of what each object still shows after occlusion (the box a labeller would draw)."""
    annotations = []
    for i, obj in enumerate(objects):
        mh, mw = obj.mask.shape
        ys, xs = np.nonzero(owner[obj.top : obj.top + mh, obj.left : obj.left + mw] == i)
        ys, xs = ys + obj.top, xs + obj.left
        if len(xs) == 0:
            continue  # fully hidden (cannot happen with MAX_OVERLAP < 1, kept as a guard)
        x, y = int(xs.min()), int(ys.min())
        bw, bh = int(xs.max()) - x + 1, int(ys.max()) - y + 1  # pixel edges: a 1-px object has w = 1
        annotations.append(
            {
                "category_id": obj.category_id,
                "bbox": [x, y, bw, bh],
                "area": bw * bh,
                "iscrowd": int(obj.crowd),
            }
        )
    return annotations


def _image_size(rng: np.random.Generator, profile: Profile) -> tuple[int, int]:
    """(height, width) of the next image."""
    if profile.sides is not None:
        h, w = (int(v) for v in rng.integers(profile.sides[0], profile.sides[1] + 1, size=2))
        return h, w
    short = int(rng.integers(360, 481))
    return (640, short) if rng.random() < 0.25 else (short, 640)  # a quarter portrait, as in COCO


def _render_image(rng: np.random.Generator, profile: Profile) -> tuple[bytes, int, int, list[dict]]:
    """One image: (JPEG bytes, height, width, annotations without ids)."""
    # The order of the rng draws below is what makes a seed reproduce the same dataset: keep it.
    h, w = _image_size(rng, profile)
    objects: list[_Object] = []
    if rng.random() >= profile.empty_fraction:
        objects = _place_objects(rng, _draw_objects(rng, h, w, profile), h, w)
    pixels, owner = _paint(rng, objects, h, w)
    annotations = _visible_annotations(objects, owner)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), h, w, annotations


def _write_image(images_dir: Path, seed: int, index: int, profile: Profile) -> tuple[dict, list[dict]]:
    """Render and write image `index`: (its COCO image record, its annotations without ids)."""
    rng = np.random.default_rng((seed, index))
    data, h, w, anns = _render_image(rng, profile)
    image_id = index + 1
    file_name = f"{image_id:06d}.jpg"
    (images_dir / file_name).write_bytes(data)
    return {"id": image_id, "file_name": file_name, "height": h, "width": w}, [
        {"image_id": image_id, **a} for a in anns
    ]


def generate(
    output_dir: str | Path, num_images: int, seed: int = 0, profile: Profile | str = SAMPLE, workers: int = 1
) -> Path:
    """Write `num_images` images and ``annotations.json`` under `output_dir`; return the annotations path.

    `workers` > 1 renders in that many processes; the output is the same as with one (each image has its own rng).
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
        profile = PROFILES[profile]
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    render = functools.partial(_write_image, out / "images", seed, profile=profile)
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            rendered = list(pool.map(render, range(num_images), chunksize=64))
    else:
        rendered = [render(index) for index in range(num_images)]
    images = [image for image, _ in rendered]
    annotations = [{"id": k + 1, **a} for k, a in enumerate(a for _, anns in rendered for a in anns)]
    coco = {
        "info": {"description": f"retina synthetic shapes ({profile.name})", "version": "1", "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in profile.categories],
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="output directory (images/ and annotations.json)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="sample")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images")
    args = parser.parse_args(argv)
    path = generate(args.output, args.num_images, args.seed, args.profile, args.workers)
    print(f"wrote {args.num_images} images and {path}")


if __name__ == "__main__":
    main()
