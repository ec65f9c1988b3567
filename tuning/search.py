"""Search the focal-loss hyperparameters (γ, α, π, optionally lr) with Ray Tune; each trial trains with Ray Train.

    python tuning/search.py --config configs/NAME.yaml --num-samples N [--max-concurrent-trials M]
        [--search-alg tpe|random|grid] [--scheduler asha|none] [--set section.key=value ...] [--resume-errored]

The space is the config's ``tuning`` section (defaults: γ uniform [0, 5], α uniform [0.1, 0.9], π log-uniform
[1e-3, 0.2]; ``--set tuning.lr.kind=loguniform`` adds the learning rate). An invalid space is an error naming
the key before Ray starts. The command-line flags override tuning.num_samples, .max_concurrent_trials,
.search_alg and .scheduler.

Each trial runs one multi-worker TorchTrainer (scaling.*) and reports val/AP after every evaluation; ASHA stops
weak trials between epochs. With --set tuning.seeds=N every configuration trains N times (train.seed = base,
base + 1, ...): the tables report each configuration's mean, std and n of val/AP, and the best mean wins.
Trials run side by side as far as the cluster's CPUs/GPUs allow. A trial that diverges or fails is recorded as
failed and the search goes on.

Resume: the search lives in ``<tuning.storage_path or run.storage_path>/<tuning.name or run.name_search>``.
Running the same command again restores it there: finished trials are kept, interrupted ones continue (from
their Train checkpoints), failed ones stay failed unless --resume-errored. The restored search keeps its
original settings (num_samples, searcher, scheduler).

Console: one line per trial as it ends (its γ, α, π, best val/AP and AP50, and how it ended: completed, stopped
early by ASHA, diverged, failed with its error class), then every trial in a table, best val/AP first, the best
trial and where the MLflow runs are. Ray Tune's own status table and per-result output only with --verbose.

MLflow: one parent run per search, one nested child run per trial (params gamma/alpha/prior, its metrics); the
parent gets the results table (CSV), the configurations over their seeds and a plot of val/AP against each
hyperparameter. The best configuration's best seed's model is registered (tracking.registered_model_name);
tracking.alias (e.g. champion) moves to it only if it beats the current champion's val/AP.

Cluster: with RAY_ADDRESS set (or under ``ray job submit``) the search uses that cluster; otherwise it starts a
local Ray with its dashboard on 127.0.0.1 (Train V2 under Tune needs it to release stopped trials' workers).
"""

from __future__ import annotations

import argparse
import sys

from pipelines import cli
from tuning.config import load_search_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_config_arguments(parser, "configs/smoke.yaml", "--set tuning.gamma.high=3")
    parser.add_argument("--num-samples", type=int, help="configurations to try (tuning.num_samples), "
                        "each trained tuning.seeds times")  # fmt: skip
    parser.add_argument("--max-concurrent-trials", type=int, help="cap on trials at a time (0: as the cluster fits)")
    parser.add_argument("--search-alg", choices=["tpe", "random", "grid"], help="tuning.search_alg (default tpe)")
    parser.add_argument("--scheduler", choices=["asha", "none"], help="tuning.scheduler (default asha)")
    parser.add_argument("--resume-errored", action="store_true", help="on restore, run failed trials again")
    return parser.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """--set values, then the dedicated flags (which win)."""
    flags = {
        "tuning.num_samples": args.num_samples,
        "tuning.max_concurrent_trials": args.max_concurrent_trials,
        "tuning.search_alg": args.search_alg,
        "tuning.scheduler": args.scheduler,
    }
    return [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        cfg = load_search_config(args.config, overrides_from_args(args))  # the whole space is checked here
        from tuning.experiment import run_search, summary

        outcome = run_search(cfg, resume_errored=args.resume_errored, config_path=args.config)
        print(summary(outcome))
        if outcome.interrupted:
            return cli.EXIT_INTERRUPTED
        return 0 if outcome.best is not None else cli.EXIT_FAILED

    return cli.run_command("search", body, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
