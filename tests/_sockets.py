"""Which TCP ports a set of processes listens on, read from /proc (Linux), without ``ss``."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def tagged(tag: str) -> list[int]:
    """Live processes whose environment holds ``tag`` (a run's children inherit it)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if tag.encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def _inodes(pids: list[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    out.add(link[8:-1])
        except OSError:
            continue
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = ipaddress.IPv6Address(words)
    return str(ip.ipv4_mapped or ip)


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """``(address, port)`` of every TCP socket in LISTEN state held by ``pids``."""
    inodes = _inodes(pids)
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == LISTEN and f[9] in inodes:
                addr, port = f[1].rsplit(":", 1)
                out.add((_address(addr), int(port, 16)))
    return out


def off_loopback(socks: set[tuple[str, int]]) -> set[tuple[str, int]]:
    return {(a, p) for a, p in socks if not ipaddress.ip_address(a).is_loopback}
