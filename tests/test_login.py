"""``cargohold login``/``logout`` against real registries (htpasswd, token), storing in docker's config.json or
through a real credential helper executable; no password on the command line."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support import BasicAuthRegistry, TokenRegistry
from tests.support.cli import cargohold_cmd

from cargohold.devtools import samples
from cargohold.devtools.registry import push_blob, push_manifest

HELPER = """#!/bin/sh
# docker-credential-testhelper: keeps one JSON document per server in $TESTHELPER_DIR.
set -e
read -r line || true
case "$1" in
  store) server=$(printf %s "$line" | sed 's/.*"ServerURL": *"\\([^"]*\\)".*/\\1/')
         printf %s "$line" > "$TESTHELPER_DIR/$(printf %s "$server" | tr ':/' '__')" ;;
  get)   f="$TESTHELPER_DIR/$(printf %s "$line" | tr ':/' '__')"
         if [ -f "$f" ]; then sed 's/"ServerURL": *"[^"]*", *//' "$f"; else echo "credentials not found"; exit 1; fi ;;
  erase) rm -f "$TESTHELPER_DIR/$(printf %s "$line" | tr ':/' '__')" ;;
esac
"""


def _run(root: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cargohold_cmd(root, *args), input=stdin, text=True, capture_output=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL if stdin is None else None)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker")}


def _seed(reg: BasicAuthRegistry) -> str:
    img = samples.build_image([samples.small_base_layer()])
    for blob in img.blobs:
        push_blob(reg.registry.url, "private/app", blob.data, auth_header=reg.auth_header)
    push_manifest(reg.registry.url, "private/app", "v1", img.manifest.data, img.manifest.media_type,
                  auth_header=reg.auth_header)
    return f"{reg.registry.host}/private/app:v1"


def test_login_stores_auth_in_config_json_and_pull_uses_it(tmp_path: Path, basic_registry: BasicAuthRegistry
                                                           ) -> None:
    env = _env(tmp_path)
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {"other.example:5000": {"auth": "eDp5"}}, "detachKeys": "ctrl-e"}))
    ref = _seed(basic_registry)
    host = basic_registry.registry.host
    root = tmp_path / "root"

    # Without credentials the pull is refused; --user without a password and no terminal says so.
    denied = _run(root, env, "pull", ref)
    assert denied.returncode == 1 and "unauthorized" in denied.stderr
    no_tty = _run(root, env, "pull", "--user", "alice", ref)
    assert no_tty.returncode == 2
    assert "stdin is not a terminal" in no_tty.stderr and "interrupted" not in no_tty.stderr

    out = _run(root, env, "login", "--username", "alice", "--password-stdin", host, stdin="s3cret-pw\n")
    assert out.returncode == 0, out.stderr
    assert f"credentials for {host} stored in {config}" in out.stdout
    doc = json.loads(config.read_text())
    assert doc["detachKeys"] == "ctrl-e" and "other.example:5000" in doc["auths"]
    assert base64.b64decode(doc["auths"][host]["auth"]).decode() == "alice:s3cret-pw"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    pulled = _run(root, env, "pull", "--no-unpack", ref)
    assert pulled.returncode == 0, pulled.stderr

    out = _run(root, env, "logout", host)
    assert out.returncode == 0, out.stderr
    assert host not in json.loads(config.read_text())["auths"]
    again = _run(root, env, "logout", host)
    assert again.returncode == 1 and f"not logged in to {host}" in again.stderr


def test_login_with_a_wrong_password_stores_nothing(tmp_path: Path, basic_registry: BasicAuthRegistry) -> None:
    env = _env(tmp_path)
    host = basic_registry.registry.host
    out = _run(tmp_path / "root", env, "login", "-u", "alice", "--password-stdin", host, stdin="wrong\n")
    assert out.returncode == 1
    assert out.stderr.count("cargohold: error:") == 1 and "rejected" in out.stderr and "alice" in out.stderr
    assert not (tmp_path / "docker" / "config.json").exists()
    # The password is never asked for without a terminal, and never taken from the command line.
    prompt = _run(tmp_path / "root", env, "login", "-u", "alice", host)
    assert prompt.returncode == 2 and "--password-stdin" in prompt.stderr


def test_login_to_a_token_registry(tmp_path: Path, make_token_registry: Callable[..., TokenRegistry]) -> None:
    reg = make_token_registry(allow_anonymous=False)
    env = _env(tmp_path)
    host = reg.registry.host
    bad = _run(tmp_path / "root", env, "login", "-u", "bob", "--password-stdin", host, stdin="nope")
    assert bad.returncode == 1 and "unauthorized" in bad.stderr
    ok = _run(tmp_path / "root", env, "login", "-u", "bob", "--password-stdin", host, stdin="t0ken-pw")
    assert ok.returncode == 0, ok.stderr
    auth = json.loads((tmp_path / "docker" / "config.json").read_text())["auths"][host]["auth"]
    assert base64.b64decode(auth).decode() == "bob:t0ken-pw"


def test_login_through_a_credential_helper(tmp_path: Path, basic_registry: BasicAuthRegistry) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-testhelper"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    store = tmp_path / "helper-store"
    store.mkdir()
    host = basic_registry.registry.host
    env = {**_env(tmp_path), "PATH": f"{bindir}:{os.environ['PATH']}", "TESTHELPER_DIR": str(store)}
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"credHelpers": {host: "testhelper"}}))
    ref = _seed(basic_registry)

    out = _run(tmp_path / "root", env, "login", "-u", "alice", "--password-stdin", host, stdin="s3cret-pw")
    assert out.returncode == 0, out.stderr
    assert "docker-credential-testhelper" in out.stdout
    kept = json.loads((store / host.replace(":", "_")).read_text())
    assert kept == {"ServerURL": host, "Username": "alice", "Secret": "s3cret-pw"}
    assert json.loads(config.read_text()) == {"credHelpers": {host: "testhelper"}}  # no password in the file

    pulled = _run(tmp_path / "root", env, "pull", "--no-unpack", ref)  # the helper's get answers
    assert pulled.returncode == 0, pulled.stderr

    out = _run(tmp_path / "root", env, "logout", host)
    assert out.returncode == 0, out.stderr
    assert list(store.iterdir()) == []
