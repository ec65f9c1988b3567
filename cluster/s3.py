"""Storage helpers: one API for local paths and ``s3://bucket/prefix`` URIs.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL`` variable and credentials from the standard AWS
chain (env vars, shared files, instance roles), so the same commands run against AWS, MinIO or moto.

Ray workers are separate processes that may not share the driver's environment (a local Ray started before
the variables were set, or a cluster whose nodes have other settings). `S3Settings.from_env()` is therefore
resolved on the driver and handed to the work explicitly: the endpoint and region always, the credentials only
when they came from static env vars (instance-role / SSO credentials are temporary; workers resolve their own).
Settings never go into a runtime_env or a log line (the dashboard shows runtime_envs).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pyarrow.fs as pafs
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError


class StorageError(OSError):
    """A read/write/list failed; the message names the path (bucket and key) and the cause."""


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ("bucket", "a/b")."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for both local paths and s3:// URIs."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


@dataclass(frozen=True)
class S3Settings:
    """What a worker needs to reach the same S3 as the driver (picklable; repr hides the secrets)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, credentials=<hidden>)"

    @classmethod
    def from_env(cls) -> S3Settings:
        session = boto3.session.Session()
        creds = session.get_credentials()
        forward = creds is not None and creds.method == "env"  # static keys only; roles refresh themselves
        frozen = creds.get_frozen_credentials() if forward else None
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=session.region_name,
            access_key=frozen.access_key if frozen else None,
            secret_key=frozen.secret_key if frozen else None,
            session_token=frozen.token if frozen else None,
        )


# An S3 endpoint that is briefly unreachable (restarting, a network partition) must delay a run, not fail it: a
# failed checkpoint upload costs a worker-group restart, and a restart during the outage cannot read its checkpoint
# (benchmarks/faults.py, "s3-down", failed the run with 5 attempts). So network errors, throttling and 5xx are
# retried with exponential backoff for about 100 s per request; errors S3 answers (AccessDenied, NoSuchKey,
# NoSuchBucket) are never retried and fail at once.
# pyarrow (Ray Train's checkpoints, Ray Data's shards): AWS's default strategy, 25 ms x 2^i before retry i, so 11
# retries (max_attempts=12) wait 25 ms x (2^12 - 2) = 102 s in all, deterministically.
ARROW_RETRY_ATTEMPTS = 12
# boto3 (listing, small objects, deletes): botocore's standard mode, a random share of min(2^i s, 20 s) before retry
# i; 10 attempts wait up to 111 s, ~55 s on average.
_BOTO_CONFIG = BotoConfig(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=10, read_timeout=60)


def client(settings: S3Settings | None = None):
    """A boto3 S3 client for `settings` (default: the current environment), cached per process and settings."""
    return _client(settings or S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _client(s: S3Settings):
    return boto3.client(
        "s3",
        endpoint_url=s.endpoint_url,
        region_name=s.region,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        aws_session_token=s.session_token,
        config=_BOTO_CONFIG,
    )


def _fail(action: str, uri: str, exc: Exception) -> StorageError:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        return StorageError(f"{action} {uri} failed: {code}: {exc}")
    return StorageError(f"{action} {uri} failed: {exc}")


def read_bytes(path: str | os.PathLike, settings: S3Settings | None = None) -> bytes:
    """Whole object / file as bytes. Missing → FileNotFoundError naming the path; other failures StorageError."""
    path = str(path)
    if not is_s3(path):
        return Path(path).read_bytes()
    bucket, key = split_s3(path)
    try:
        return client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            raise FileNotFoundError(f"no such object: {path}") from None
        raise _fail("read", path, exc) from None
    except BotoCoreError as exc:
        raise _fail("read", path, exc) from None


def write_bytes(path: str | os.PathLike, data: bytes, settings: S3Settings | None = None) -> None:
    """Write atomically: a single PUT on S3; write-to-temp + rename locally (readers never see half a file)."""
    path = str(path)
    if not is_s3(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    bucket, key = split_s3(path)
    try:
        client(settings).put_object(Bucket=bucket, Key=key, Body=data)
    except (ClientError, BotoCoreError) as exc:
        raise _fail("write", path, exc) from None


def exists(path: str | os.PathLike, settings: S3Settings | None = None) -> bool:
    path = str(path)
    if not is_s3(path):
        return Path(path).exists()
    bucket, key = split_s3(path)
    try:
        client(settings).head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _fail("check", path, exc) from None


def list_files(prefix: str | os.PathLike, settings: S3Settings | None = None) -> Iterator[str]:
    """Every file under a directory / key prefix, as full paths (s3:// URIs for S3), sorted."""
    prefix = str(prefix)
    if not is_s3(prefix):
        root = Path(prefix)
        yield from (str(p) for p in sorted(root.rglob("*")) if p.is_file())
        return
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    try:
        pages = client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"
    except (ClientError, BotoCoreError) as exc:
        raise _fail("list", prefix, exc) from None


def delete_prefix(prefix: str | os.PathLike, settings: S3Settings | None = None) -> int:
    """Delete every file under a directory / key prefix; return how many."""
    prefix = str(prefix)
    files = list(list_files(prefix, settings))
    if not is_s3(prefix):
        import shutil

        if Path(prefix).exists():
            shutil.rmtree(prefix)
        return len(files)
    bucket, _ = split_s3(prefix)
    keys = [split_s3(f)[1] for f in files]
    try:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            client(settings).delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    except (ClientError, BotoCoreError) as exc:
        raise _fail("delete", prefix, exc) from None
    return len(keys)


def arrow_filesystem(path: str | os.PathLike, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (``bucket/key`` for S3), e.g. for Ray Data read/write_parquet.

    The S3 filesystem carries the driver's settings when it is pickled to Ray workers (see module docstring).
    """
    path = str(path)
    if not is_s3(path):
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    s = settings or S3Settings.from_env()
    kwargs = {
        "region": s.region or "us-east-1",
        "access_key": s.access_key,
        "secret_key": s.secret_key,
        "session_token": s.session_token,
    }
    if s.endpoint_url:
        parsed = urlparse(s.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    bucket, key = split_s3(path)
    return RetryingS3FileSystem(**{k: v for k, v in kwargs.items() if v is not None}), f"{bucket}/{key}".rstrip("/")


class RetryingS3FileSystem(pafs.S3FileSystem):
    """`pafs.S3FileSystem` with the retries above, also after pickling: pyarrow's own pickling drops the retry
    strategy (checked against pyarrow 25.0.1), so the copy a Ray worker gets would give up after ~1 s."""

    def __init__(self, **kwargs) -> None:
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=ARROW_RETRY_ATTEMPTS), **kwargs)
        self._kwargs = kwargs

    def __reduce__(self):
        return _rebuild_s3, (self._kwargs,)


def _rebuild_s3(kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**kwargs)
