"""The kernel log: Xid errors of the NVIDIA driver and block-device I/O errors.

Reads ``/dev/kmsg`` (records ``prio,seq,usec,flags;message``) or a plain file
in ``dmesg`` format (``[  12.345678] message``) through an injectable path, so
tests feed recorded lines. Reading is incremental: each call returns only the
records added since the previous one; the caller keeps what it has seen for
the current boot.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

# NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.
XID_RE = re.compile(r"NVRM: Xid \((?P<pci>PCI:[0-9A-Fa-f:.]+)\): (?P<code>\d+)(?:, (?P<rest>.*))?")
IO_ERROR_RES = (
    re.compile(r"(?:blk_update_request|critical medium error|I/O error), dev (?P<dev>[\w.-]+)"),
    re.compile(r"I/O error, dev (?P<dev>[\w.-]+), sector"),
    re.compile(r"Buffer I/O error on dev(?:ice)? (?P<dev>[\w.-]+)"),
    re.compile(r"EXT4-fs error \(device (?P<dev>[\w.-]+)\)"),
    re.compile(r"XFS \((?P<dev>[\w.-]+)\): (?:metadata I/O error|Corruption)"),
    re.compile(r"nvme(?P<dev>\d+n?\d*): (?:I/O \d+ QID \d+ timeout|Device not ready)"),
)
_KMSG_RE = re.compile(r"^\d+,\d+,\d+,[^;]*;(?P<msg>.*)$")
_DMESG_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?(?P<msg>.*)$")


@dataclass(frozen=True, slots=True)
class XidEvent:
    pci: str
    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class IoError:
    device: str
    line: str


def parse_line(raw: str) -> str:
    """The message part of a kmsg record or a dmesg line."""
    raw = raw.rstrip("\n")
    m = _KMSG_RE.match(raw) or _DMESG_RE.match(raw)
    return m.group("msg") if m else raw


def scan(lines: list[str]) -> tuple[list[XidEvent], list[IoError]]:
    xids: list[XidEvent] = []
    ios: list[IoError] = []
    for raw in lines:
        msg = parse_line(raw)
        m = XID_RE.search(msg)
        if m:
            xids.append(XidEvent(m.group("pci"), int(m.group("code")), (m.group("rest") or "").strip()[:200]))
            continue
        for r in IO_ERROR_RES:
            m = r.search(msg)
            if m:
                ios.append(IoError(m.group("dev"), msg[:200]))
                break
    return xids, ios


class KernelLog:
    """Incremental reader of /dev/kmsg or a dmesg-format file."""

    def __init__(self, path: Path | str = "/dev/kmsg"):
        self.path = Path(path)
        self._offset = 0
        self._fd: int | None = None
        self._partial = ""

    def _is_kmsg(self) -> bool:
        return self.path.is_char_device()

    def read_new(self) -> list[str]:
        if not self.path.exists():
            return []
        if self._is_kmsg():
            return self._read_kmsg()
        size = self.path.stat().st_size
        if size < self._offset:  # rotated or truncated (reboot): read from the start
            self._offset = 0
            self._partial = ""
        with self.path.open("r", errors="replace") as f:
            f.seek(self._offset)
            data = f.read()
            self._offset = f.tell()
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        return [ln for ln in lines if ln]

    def _read_kmsg(self) -> list[str]:
        if self._fd is None:
            self._fd = os.open(str(self.path), os.O_RDONLY | os.O_NONBLOCK)
        out = []
        while True:
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten records: continue with the next
                    continue
                raise
            if not rec:
                break
            out.append(rec.decode(errors="replace"))
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
