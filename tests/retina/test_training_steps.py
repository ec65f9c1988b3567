"""A few SGD steps of a small RetinaNet on the sample data reduce the loss (the model and loss are trainable)."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from retina.config import ModelConfig
from retina.data.synthetic import generate
from retina.model import build_retinanet


def _load_sample(tmp_path, num_images: int):
    ann_path = generate(tmp_path / "sample", num_images=num_images, seed=5)
    coco = json.loads(ann_path.read_text())
    cat_ids = sorted(c["id"] for c in coco["categories"])
    label_of = {cid: i for i, cid in enumerate(cat_ids)}  # COCO id → contiguous label
    images, targets = [], []
    for info in coco["images"]:
        pil = Image.open(ann_path.parent / "images" / info["file_name"]).convert("RGB")
        images.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255)
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            }
        )
    return images, targets, len(cat_ids)


def test_a_few_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    images, targets, num_classes = _load_sample(tmp_path, num_images=4)
    assert sum(len(t["boxes"]) for t in targets) > 0
    cfg = ModelConfig(num_classes=num_classes)
    cfg.backbone.name = "resnet18"
    cfg.backbone.norm = "bn"
    cfg.backbone.trainable_layers = 5
    cfg.backbone.fpn_channels = 32
    cfg.head.norm = "gn"
    cfg.input.min_size, cfg.input.max_size = 160, 224
    model = build_retinanet(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(12):
        losses = model(images, targets)
        loss = losses["loss_cls"] + losses["loss_box"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        history.append(loss.item())
    assert min(history[-3:]) < 0.7 * history[0], history
