"""Damage in SQLite's write-ahead log, found before SQLite silently drops what follows it.

SQLite reads the WAL frame by frame and stops at the first frame whose checksum does not match (the checksums
are cumulative: each frame's covers every frame before it). That is how it tells a torn last write after a power
cut from a committed transaction. But one damaged frame in the middle (a bad sector, a flipped bit on an SD card)
looks the same to it: every transaction committed after that frame is ignored, without an error, and
``PRAGMA quick_check`` passes. An audit lost 1,083 of 1,265 results this way.

A torn tail is only ever the last transaction (with ``synchronous=FULL`` the WAL is fsynced at every commit, so a
later commit cannot be on disk unless everything before it is). So: a frame that fails its check followed by a
*later, complete transaction* whose frames check out against the stored checksums is damage, not a torn tail.
:func:`inspect` finds that; :func:`repair` writes a copy of the WAL whose checksum chain is recomputed through the
last such transaction, so SQLite applies it (the damaged page is read as it is; the salvage that follows copies
out every row that can still be read). The original file is never changed.

File format: https://www.sqlite.org/fileformat2.html#the_write_ahead_log (big-endian header fields; the
checksum's 32-bit words are little-endian for magic 0x377f0682 and big-endian for 0x377f0683).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_MAGIC_LE, _MAGIC_BE = 0x377F0682, 0x377F0683
_HEADER, _FRAME_HEADER = 32, 24
_VERSION = 3007000
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class WalDamage:
    """What is wrong with a WAL file.

    Attributes:
        first_bad: index of the first frame SQLite would reject (0 when the header itself is damaged).
        used_commits: transactions SQLite would still apply (before the damage).
        lost_commits: complete transactions after the damage that SQLite would silently drop.
        last_commit: index of the last frame of the last of those.
        header_bad: the WAL header itself fails its check (SQLite would ignore the whole file).
        page_size: the database page size.
    """

    first_bad: int
    used_commits: int
    lost_commits: int
    last_commit: int
    header_bad: bool
    page_size: int

    def describe(self) -> str:
        """One line for the log."""
        where = "its header" if self.header_bad else f"frame {self.first_bad}"
        return (
            f"the write-ahead log is damaged at {where}: SQLite would have dropped the {self.lost_commits} "
            f"transactions committed after it (keeping {self.used_commits})"
        )


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def _page_size(db_path: Path) -> int | None:
    try:
        with db_path.open("rb") as fh:
            head = fh.read(18)
    except OSError:
        return None
    if len(head) < 18 or not head.startswith(b"SQLite format 3\0"):
        return None
    size = int.from_bytes(head[16:18], "big")
    return 65536 if size == 1 else size


def inspect(wal: Path, db: Path) -> WalDamage | None:
    """Check ``wal`` (the ``-wal`` file of database ``db``) for damage that SQLite would silently skip.

    Returns:
        None when the log is intact, or ends in a torn last transaction (a power cut: nothing committed is lost).
    """
    try:
        data = wal.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER + _FRAME_HEADER:
        return None
    magic, version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:_HEADER])
    big = magic == _MAGIC_BE
    header_ok = magic in (_MAGIC_LE, _MAGIC_BE) and version == _VERSION
    header_ok = header_ok and _checksum(data[:24], 0, 0, big) == (c1, c2)
    if not header_ok:
        # Salts and page size from elsewhere: the first frame carries the salts, the database file the size.
        page_size = _page_size(db) or 0
        if page_size < 512 or len(data) < _HEADER + _FRAME_HEADER + page_size:
            return None
        salt1, salt2 = struct.unpack(">2I", data[_HEADER + 8 : _HEADER + 16])
        big = magic == _MAGIC_BE
    frame = _FRAME_HEADER + page_size
    count = (len(data) - _HEADER) // frame
    running = (c1, c2) if header_ok else None
    first_bad, used, lost, last_commit = (None if header_ok else 0), 0, 0, -1
    stored_prev: tuple[int, int] | None = None
    for i in range(count):
        at = _HEADER + i * frame
        head = data[at : at + _FRAME_HEADER]
        pgno, commit, f1, f2, k1, k2 = struct.unpack(">6I", head)
        if (f1, f2) != (salt1, salt2) or pgno == 0:
            stored_prev = None  # a frame of an older log generation, or garbage: no chain across it
            continue
        body = head[:8] + data[at + _FRAME_HEADER : at + frame]
        if first_bad is None and running is not None:
            if _checksum(body, *running, big) == (k1, k2):
                running = (k1, k2)
                if commit:
                    used += 1
                stored_prev = (k1, k2)
                continue
            first_bad = i
            if commit:  # the damaged frame ends its own transaction
                lost, last_commit = 1, i
        # After the damage: does this frame check out against the checksum stored in the frame before it?
        elif stored_prev is not None and _checksum(body, *stored_prev, big) == (k1, k2) and commit:
            lost += 1
            last_commit = i
        stored_prev = (k1, k2)
    # The damaged frame's own transaction may be a torn last write; only a complete one after it proves damage.
    if first_bad is None or lost < 2:
        return None
    return WalDamage(first_bad, used, lost, last_commit, not header_ok, page_size)


def repair(wal: Path, damage: WalDamage, out: Path) -> None:
    """Write a copy of ``wal`` to ``out`` whose checksum chain is valid through ``damage.last_commit``.

    Frames keep their content (a damaged page stays damaged; the salvage skips what cannot be read). Frames after
    the last complete transaction are left as they are, so SQLite stops there as it would after a torn write.

    Raises:
        OSError: ``wal`` cannot be read or ``out`` written.
    """
    data = bytearray(wal.read_bytes())
    page_size = damage.page_size
    if damage.header_bad:
        salt1, salt2 = struct.unpack(">2I", data[_HEADER + 8 : _HEADER + 16])
        struct.pack_into(">6I", data, 0, _MAGIC_LE, _VERSION, page_size, 0, salt1, salt2)
    big = struct.unpack(">I", data[:4])[0] == _MAGIC_BE
    running = _checksum(bytes(data[:24]), 0, 0, big)
    struct.pack_into(">2I", data, 24, *running)
    salts = bytes(data[16:24])
    frame = _FRAME_HEADER + page_size
    for i in range(damage.last_commit + 1):
        at = _HEADER + i * frame
        # Every frame up to a later commit belongs to this log generation (the log is written in order from its
        # start): a damaged salt is put right too, or SQLite would stop at that frame.
        data[at + 8 : at + 16] = salts
        running = _checksum(bytes(data[at : at + 8]) + bytes(data[at + _FRAME_HEADER : at + frame]), *running, big)
        struct.pack_into(">2I", data, at + 16, *running)
    out.write_bytes(bytes(data))
