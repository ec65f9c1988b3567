"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (no mocks in the code under test).

Use it from any test module::

    from tests.s3_server import s3_server  # noqa: F401  (pytest finds the fixture by name)

    def test_something(s3_server):
        bucket = s3_server.new_bucket()          # "s3://<unique>"
        ...                                      # code reads AWS_ENDPOINT_URL etc. from os.environ

The fixture is session-scoped: one server per pytest session, stopped through its own handle at the end.
It sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION in ``os.environ`` for the
session and restores the previous values afterwards. Ray workers started *before* the fixture do not see these
variables; the project's code therefore passes S3 settings to its Ray tasks explicitly
(``cluster.s3.S3Settings.from_env()`` resolved on the driver). Code that relies on the workers' own environment
(e.g. Ray Train's ``storage_path="s3://..."``) needs Ray started after this fixture, or ``env_vars`` from
`S3Server.env` in the job's runtime_env.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str]  # the variables the fixture set (fake credentials: moto accepts any)
    server: object = field(repr=False)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a bucket with a unique name; return ``s3://name``."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env, server)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
