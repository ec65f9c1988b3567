"""Paths that may be local or s3://: what Ray's storage_path wants, and local paths made absolute (Ray workers
and ``ray job submit`` drivers run in other working directories)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster import s3


def absolute(path: str) -> str:
    """A local path made absolute; s3:// URIs and "" unchanged."""
    return path if not path or s3.is_s3(path) else str(Path(path).absolute())


def storage_location(path: str) -> tuple[str, Any, str]:
    """(storage_path for Ray, pyarrow filesystem or None, display URI). Local paths become absolute."""
    if s3.is_s3(path):
        fs, inner = s3.arrow_filesystem(path)
        return inner, fs, path.rstrip("/")
    absolute_path = str(Path(path).absolute())
    return absolute_path, None, absolute_path
