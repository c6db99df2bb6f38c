"""The metadata database stays usable: a full disk never stops the commands that free space, a database held by
another process is a bounded, explained wait, and sqlite3 errors reach users as cargohold errors naming the file.

Real parts only: a real tmpfs filled to the last byte, a real second process holding SQLite's write lock, the real
CLI in a subprocess."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.cli import cli

from cargohold.config import load_config
from cargohold.errors import CargoholdError, FailedPreconditionError, InvalidArgumentError, UnavailableError
from cargohold.metadata.db import MetadataDB, lock_holder


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(fs: Path) -> None:
    """Write until the filesystem has no byte left."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A database whose write lock is held by another process (BEGIN IMMEDIATE) until the test ends."""
    path = tmp_path / "root" / "metadata.db"
    cli(path.parent, "gc")  # create it as a writing command would
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE')\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    try:
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_full_disk_leaves_a_root_every_command_can_open(small_fs: Path) -> None:
    root = small_fs / "root"
    cli(root, "gc")  # a writing command creates the root
    fill(small_fs)
    # Reading commands and the commands that free space open the database without writing.
    assert cli(root, "images", "ls", "-q").stdout == ""
    cli(root, "gc", "--dry-run")
    # A command that must write fails with one clear error naming the database, not a sqlite3 traceback.
    proc = cli(root, "-n", "fresh", "images", "ls", check=False)
    assert proc.returncode != 0
    assert f"metadata database {root / 'metadata.db'}" in proc.stderr
    assert "Traceback" not in proc.stderr and "no transaction is active" not in proc.stderr
    # Once space is freed, the root works as before.
    (small_fs / "filler").unlink()
    cli(root, "-n", "fresh", "images", "ls")


def test_schema_upgrade_on_a_full_disk_is_one_clear_error(small_fs: Path) -> None:
    path = small_fs / "metadata.db"
    old = sqlite3.connect(path)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (0)")
    old.commit()
    old.close()
    fill(small_fs)
    with pytest.raises(FailedPreconditionError) as info:
        MetadataDB(path)
    assert f"metadata database {path} needs a schema upgrade" in str(info.value)
    (small_fs / "filler").unlink()
    db = MetadataDB(path)
    db.ensure_namespace("default")
    assert db.namespaces() == ["default"]


def test_opening_an_up_to_date_database_writes_nothing(tmp_path: Path) -> None:
    db = MetadataDB(tmp_path / "metadata.db")
    db.ensure_namespace("default")
    db.close()
    wal = tmp_path / "metadata.db-wal"
    before = (tmp_path / "metadata.db").read_bytes(), wal.read_bytes() if wal.exists() else b""
    again = MetadataDB(tmp_path / "metadata.db")
    again.ensure_namespace("default")
    assert again.namespaces() == ["default"]
    again.close()
    after = (tmp_path / "metadata.db").read_bytes(), wal.read_bytes() if wal.exists() else b""
    assert after == before


def test_a_failed_statement_rolls_back_without_a_second_error(tmp_path: Path) -> None:
    db = MetadataDB(tmp_path / "metadata.db")
    with pytest.raises(CargoholdError) as info, db.transaction() as conn:
        conn.execute("INSERT INTO no_such_table VALUES (1)")
    assert f"metadata database {tmp_path / 'metadata.db'}: write: no such table" in str(info.value)
    assert not db.conn.in_transaction
    db.ensure_namespace("after")
    assert db.namespaces() == ["after"]


def test_locked_database_is_a_bounded_wait_naming_the_holder(
        writer: tuple[Path, subprocess.Popen[str]]) -> None:
    path, proc = writer
    assert lock_holder(path) == proc.pid
    db = MetadataDB(path, lock_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        db.ensure_namespace("other")
    elapsed = time.monotonic() - start
    assert 1.4 < elapsed < 4
    assert str(info.value) == (f"metadata database {path}: write: still locked by pid {proc.pid} after 1.5 s "
                               "(see --lock-timeout)")
    # Reads do not need the writer's lock.
    assert db.namespaces() == ["default"]


def test_cli_tells_why_it_waits_and_gives_up_after_lock_timeout(
        writer: tuple[Path, subprocess.Popen[str]]) -> None:
    path, proc = writer
    start = time.monotonic()
    out = cli(path.parent, "--lock-timeout", "4.5", "-n", "other", "images", "ls", check=False)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert 4.5 < elapsed < 15
    assert f"waiting for the metadata database {path}, locked by pid {proc.pid}" in out.stderr
    assert f"cargohold: error: metadata database {path}: write: still locked by pid {proc.pid} after 4.5 s" \
        in out.stderr
    assert "Traceback" not in out.stderr
    # Reading commands are not blocked by a writer at all.
    assert cli(path.parent, "--lock-timeout", "1", "images", "ls", "-q").stdout == ""


def test_lock_is_taken_once_the_holder_finishes(writer: tuple[Path, subprocess.Popen[str]]) -> None:
    path, proc = writer
    db = MetadataDB(path, lock_timeout=20)
    assert proc.stdin is not None
    subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1); os.kill({proc.pid}, 9)"])
    start = time.monotonic()
    db.ensure_namespace("other")
    assert time.monotonic() - start < 10
    assert db.namespaces() == ["default", "other"]


def test_config_keys_for_waits_and_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("lock_timeout = 2.5\nstall_timeout = 5\nfetch_timeout = 60\n")
    config = load_config(path)
    assert (config.lock_timeout, config.stall_timeout, config.fetch_timeout) == (2.5, 5.0, 60.0)
    path.write_text('lock_timeout = "soon"\n')
    with pytest.raises(InvalidArgumentError, match=f"config {path}: lock_timeout must be a number of seconds"):
        load_config(path)
