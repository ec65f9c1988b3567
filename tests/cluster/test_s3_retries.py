"""S3 requests ride out a short outage: pyarrow filesystems from `cluster.s3` retry network errors, also in the
pickled copy a Ray worker gets (pyarrow's own pickling drops the retry strategy)."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest

from cluster import s3


@pytest.fixture
def dead_endpoint(monkeypatch):
    """An endpoint that accepts every connection and closes it at once (an S3 server going down); counts them."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(s3, "ARROW_RETRY_ATTEMPTS", 6)  # 50 + 100 + ... + 800 ms of backoff
    yield accepted
    server.close()


@pytest.mark.parametrize("pickled", [False, True])
def test_arrow_filesystem_retries_a_dead_endpoint(dead_endpoint, pickled):
    fs, path = s3.arrow_filesystem("s3://bucket/run")
    if pickled:
        fs = pickle.loads(pickle.dumps(fs))
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        fs.get_file_info(path + "/state.pt")
    # One connection per attempt, plus one: curl reconnects once by itself after the first empty reply (measured:
    # always max_attempts + 1; pyarrow's default strategy, which a plain pickled S3FileSystem falls back to, makes 3)
    assert len(dead_endpoint) == 6 + 1
