"""Data layer: COCO parsing/validation (coco), decoding and transforms (transforms), the batch contract
(collate) and the synthetic sample dataset (synthetic). Import the submodules directly."""
