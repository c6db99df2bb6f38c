"""A deterministic two-layer image shaped like RHEL/UBI/Fedora ones where unpacking as a non-root user is hard.

Layer 1 makes read-only directories (``usr/bin`` 0555 with files and a 4111 ``sudo``, ``etc/pki`` 0500 with a
file, ``opt/ro`` 0555), character devices, files owned by 1000:1000, a 0444 file, a 0000 ``etc/shadow`` and a
``security.*`` xattr. Layer 2 writes into those read-only directories of its parent: a new file in ``usr/bin``,
a whiteout of ``usr/bin/old``, and a new version of ``opt/ro/conf`` (with ``opt/ro`` repeated as a 0555
directory entry first, as real layers do).
"""

from __future__ import annotations

from cargohold.devtools.samples import Entry, SampleImage, build_image, tar_layer


def rootless_entries() -> tuple[list[Entry], list[Entry]]:
    """The entries of the two layers, in order."""
    first = [
        Entry(path="usr", kind="dir", mode=0o755),
        Entry(path="usr/bin", kind="dir", mode=0o555),
        Entry(path="usr/bin/ls", data=b"#!/bin/true ls\n", mode=0o755),
        Entry(path="usr/bin/old", data=b"#!/bin/true old\n", mode=0o755),
        Entry(path="usr/bin/sudo", data=b"#!/bin/true sudo\n", mode=0o4111),
        Entry(path="etc", kind="dir", mode=0o755),
        Entry(path="etc/pki", kind="dir", mode=0o500),
        Entry(path="etc/pki/key", data=b"not a key\n", mode=0o400),
        Entry(path="etc/motd", data=b"read-only\n", mode=0o444,
              xattrs={"security.cargohold-test": b"x"}),
        Entry(path="etc/shadow", data=b"root:*::0:::::\n", mode=0o000),
        Entry(path="dev", kind="dir", mode=0o755),
        Entry(path="dev/null", kind="char", mode=0o666, devmajor=1, devminor=3),
        Entry(path="dev/zero", kind="char", mode=0o666, devmajor=1, devminor=5),
        Entry(path="home", kind="dir", mode=0o755),
        Entry(path="home/user", kind="dir", mode=0o700, uid=1000, gid=1000),
        Entry(path="home/user/notes", data=b"mine\n", mode=0o600, uid=1000, gid=1000),
        Entry(path="opt", kind="dir", mode=0o755),
        Entry(path="opt/ro", kind="dir", mode=0o555),
        Entry(path="opt/ro/conf", data=b"version 1\n", mode=0o444),
    ]
    second = [
        Entry(path="usr/bin/new", data=b"#!/bin/true new\n", mode=0o755),
        Entry(path="usr/bin/.wh.old"),
        Entry(path="opt/ro", kind="dir", mode=0o555),
        Entry(path="opt/ro/conf", data=b"version 2, longer\n", mode=0o444),
    ]
    return first, second


def rootless_layers() -> tuple[bytes, bytes]:
    """The two uncompressed layer tars."""
    first, second = rootless_entries()
    return tar_layer(first), tar_layer(second)


def rootless_sample() -> SampleImage:
    """The image (OCI, gzip layers, linux/amd64)."""
    return build_image(list(rootless_layers()))
