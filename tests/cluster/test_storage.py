"""Local-or-s3:// paths as Ray's storage wants them (cluster/storage.py). Fast: no Ray, no S3 server."""

from __future__ import annotations

from cluster.storage import absolute, storage_location


def test_local_paths_become_absolute_and_object_storage_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs") == str(tmp_path / "runs")
    assert absolute("/already/absolute") == "/already/absolute"
    assert absolute("s3://bucket/prefix") == "s3://bucket/prefix"
    assert absolute("") == ""  # "not set" stays "not set"


def test_storage_location_of_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_location("runs") == (str(tmp_path / "runs"), None, str(tmp_path / "runs"))
