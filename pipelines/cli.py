"""What every command shares: the parser built from its docstring, the ``--config``/``--set`` arguments, logging,
and one mapping from the project's exceptions to exit codes (2: bad input or config, 1: the job failed, 130:
interrupted by Ctrl-C or SIGTERM)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # a config, data or model error: fix the input and run again
EXIT_FAILED = 1  # the job ran and failed (diverged, workers kept failing)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it): the run or search can be continued


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of `doc` (an entry point's module docstring) and whose
    epilog is the rest, kept verbatim: it holds the command synopsis and examples shown by ``--help``."""
    head, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show Ray's, Ray Data's and MLflow's own output (quiet by default)"
    )
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, config_example: str, set_example: str) -> None:
    """``--config`` (required YAML run config) and repeatable ``--set SECTION.KEY=VALUE`` into ``args.overrides``."""
    parser.add_argument("--config", required=True, help=f"YAML run config, e.g. {config_example}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one config value (YAML syntax), repeatable: {set_example}",
    )


def add_model_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """``--model`` (required: a model URI or checkpoint directory) and ``--tracking-uri`` (the MLflow store that
    resolves it): the pair every command that loads a trained model takes."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def setup_logging(verbose: bool = False) -> None:
    """The console: our lines with a time stamp; the libraries' own output only with --verbose."""
    from pipelines import console

    console.setup(verbose)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that name a bad config key, data file, model URI or storage path: exit code 2, no traceback."""
    from cluster.s3 import StorageError
    from pipelines.inference.loading import ModelLoadError
    from retina.data.coco import DataError
    from retina.typed_config import ConfigError

    return (ConfigError, DataError, ModelLoadError, StorageError, FileNotFoundError)


def run_command(
    name: str, body: Callable[[], int], failures: tuple[type[BaseException], ...] = (), *, resumable: bool = False
) -> int:
    """Run a command's body: bad input → "<name>: error: ..." and exit 2; `failures` → "<name>: failed: ..." and
    exit 1; Ctrl-C or SIGTERM → one line (how to continue, for a `resumable` command) and exit 130, not a
    traceback; anything else propagates with its traceback (a bug, not a user error)."""
    try:
        return body()
    except (KeyboardInterrupt, SystemExit):
        # Inside a command's body a SystemExit comes from Ray's signal handlers (Ray 2.60): Ray Train's SIGINT
        # handler aborts the run and exits, ray.init's SIGTERM handler exits.
        hint = ": run the same command again to continue from the latest checkpoint" if resumable else ""
        print(f"{name}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except bad_input_errors() as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except failures as exc:
        print(f"{name}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
