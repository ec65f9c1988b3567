"""Train RetinaNet with Ray Train (PyTorch DDP), evaluate with COCOeval, track and register in MLflow.

    python pipelines/train.py --config configs/NAME.yaml [--set section.key=value ...] [--restart]

The config is typed (`retina.config`): an unknown or ill-typed key is an error naming it, before anything
starts. Sections: model, data, train, scaling, run, tracking (see configs/*.yaml and docs/configuration.md).

Cluster: with RAY_ADDRESS set (or under ``ray job submit``) the run uses that cluster; otherwise it starts a
local Ray with its dashboard on 127.0.0.1.

Resume: re-running the same command (same run.name and run.storage_path) continues from the latest
checkpoint in ``<storage_path>/<name>``, in the same MLflow run. Worker failures are recovered the same way, up
to run.max_failures times. A run that already finished is reported again; if its settings changed, the command
stops and names them: choose a new run.name, or pass --restart to start the run anew.

MLflow: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db`` in the working
directory (view it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipelines import cli, console
from pipelines.config import load_config

if TYPE_CHECKING:
    from pipelines.training.run import TrainOutcome


def summary(outcome: TrainOutcome) -> str:
    m = outcome.metrics
    aps = " ".join(f"{k}={m[k]:.3f}" for k in ("val/AP", "val/AP50", "val/AP75") if k in m)
    lines = [
        f"done in {outcome.seconds:.0f} s{' (resumed)' if outcome.resumed else ''}: step {m.get('step', '?')}, {aps}",
        f"  run folder (checkpoints): {outcome.run_dir}",
    ]
    if outcome.best_checkpoint:
        lines.append(f"  best checkpoint:          {outcome.best_checkpoint}")
    lines.append(f"  MLflow run:               {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    if outcome.model:
        lines.append(f"  model:                    {outcome.model.model_uri} "
                     f"(registered {outcome.model.registered_name} v{outcome.model.version})")  # fmt: skip
        if outcome.model.champion is not None:
            lines.append(f"  {outcome.model.champion.summary()}")
        uri = outcome.model.alias_uri or f"models:/{outcome.model.registered_name}/{outcome.model.version}"
        lines.append(f"  load it with:             from pipelines.inference import load_model; "
                     f"load_model('{uri}', tracking_uri='{outcome.tracking_uri}')")  # fmt: skip
    lines.append(f"  MLflow UI:                {console.mlflow_ui(outcome.tracking_uri)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_config_arguments(parser, "configs/demo.yaml", "--set train.max_steps=100 --set run.name=x")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start the run (run.name in run.storage_path) anew: delete its checkpoints; the old MLflow run stays",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)  # a bad key stops here, before Ray starts
        import ray.train

        from pipelines.training.run import NonFiniteLossError, run_training

        try:
            outcome = run_training(cfg, args.config, restart=args.restart)
        except (NonFiniteLossError, ray.train.TrainingFailedError) as exc:
            print(f"train: failed: {exc}", file=sys.stderr)
            return cli.EXIT_FAILED
        print(summary(outcome))
        return 0

    return cli.run_command("train", body, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
