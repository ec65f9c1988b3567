"""Training on Ray Train: the driver (`run`: data checks, MLflow run, TorchTrainer, registration), the trainer
(`trainer`), and the per-worker loop (`loop`) over its named pieces: `step`, `metrics`, `evaluation`,
`checkpoint`, `optim`, `distributed`, plus the config sections Ray Train reads (`settings`)."""
