"""A checkpoint's manifest: the size and checksum of every file in it, written when it is saved and
checked before a resume loads it, so that a truncated or changed file is found instead of loaded.

The checksum is xxHash's XXH3-64 (the ``xxhash`` package, which ``datasets`` already depends on):
measured on this 2-core CPU, 6.8 GB/s against 1.05 GB/s for zlib.crc32 and 0.35 GB/s for
hashlib.blake2b, so reading the file back is what it costs. The ranks share the work: the files,
largest first, go to the rank with the fewest bytes so far (:func:`shares`), and each rank hashes
its own share (trainer/checkpoint.py runs the collectives). Pure but for reading files; no torch.
"""
from __future__ import annotations

from pathlib import Path

from launcher import rundir

ALGORITHM = "xxh3_64"
CHUNK_BYTES = 8 << 20
# What a checkpoint folder holds besides the files the save wrote: its records, and what a later
# resume adds (DeepSpeed's universal form).
NOT_HASHED = {rundir.COMPLETE, rundir.DAMAGED, rundir.MANIFEST, rundir.UNIVERSAL, rundir.UNIVERSAL + ".tmp",
              rundir.UNIVERSAL_FAILED, rundir.LATEST_UNIVERSAL}


def checksum(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sizes(folder: Path) -> dict[str, int]:
    """Every file the save wrote into ``folder`` (relative POSIX path -> bytes)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in NOT_HASHED:
            out[rel.as_posix()] = p.stat().st_size
    return out


def shares(files: dict[str, int], n: int) -> list[list[str]]:
    """``files`` (name -> bytes) cut into ``n`` shares of about equal bytes: largest first, each to the
    share with the fewest bytes so far (ties: the lower rank). The same on every rank."""
    out: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name in sorted(files, key=lambda k: (-files[k], k)):
        i = min(range(n), key=lambda r: (load[r], r))
        out[i].append(name)
        load[i] += files[name]
    return out


def describe(folder: Path, names: list[str]) -> dict[str, dict]:
    """The manifest entries of ``names`` (files in ``folder``)."""
    return {name: {"bytes": (folder / name).stat().st_size, ALGORITHM: checksum(folder / name)} for name in names}


def problems(folder: Path, entries: dict[str, dict]) -> list[str]:
    """How the files of ``folder`` differ from their manifest ``entries``: missing, another size (sizes
    are compared first: a stat), other bytes (checksums). Empty: they match."""
    out = []
    for name, want in sorted(entries.items()):
        path = folder / name
        try:
            size = path.stat().st_size
            got = checksum(path) if size == want["bytes"] else None
        except FileNotFoundError:
            out.append(f"{name} is missing")
            continue  # any other OSError (EIO, a stale handle) is raised: it does not prove damage
        if size != want["bytes"]:
            out.append(f"{name} has {size} bytes, the manifest says {want['bytes']}")
        elif got != want[ALGORITHM]:
            out.append(f"{name} has other bytes than were saved ({ALGORITHM} {got}, the manifest says "
                       f"{want[ALGORITHM]})")
    return out
