"""`cluster.local.ensure_auth_token`: the ray CLI (~2 s of imports) runs only when Ray would find no token."""

from __future__ import annotations

import cluster.local as local


def test_the_cli_runs_only_without_a_token(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(local.subprocess, "run", lambda command, **kw: calls.append(command))
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)

    local.ensure_auth_token()  # no token anywhere: generated
    assert calls == [[local.RAY, "get-auth-token", "--generate"]]
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("\n")  # empty: Ray would not use it
    local.ensure_auth_token()
    assert len(calls) == 2

    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    local.ensure_auth_token()
    local.ensure_auth_token({"RAY_AUTH_TOKEN": "xyz"})
    elsewhere = tmp_path / "token"
    elsewhere.write_text("def")
    local.ensure_auth_token({"RAY_AUTH_TOKEN_PATH": str(elsewhere), "HOME": "/nonexistent"})
    assert len(calls) == 2  # each of these finds a token
