"""The argument-parser set-up shared by the entry points (train, search, predict, evaluate)."""

from __future__ import annotations

import argparse


def docstring_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of `doc` (an entry point's module docstring) and whose
    epilog is the rest, kept verbatim: it holds the command synopsis and examples shown by ``--help``."""
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


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
