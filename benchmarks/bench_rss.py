"""Peak resident memory of ``fedrec simulate`` on the default (the whole process tree, Ray included).

Run by hand: ``python benchmarks/bench_rss.py [-- extra simulate flags]``. Polls the RSS of the
command and all its descendants every 0.2 s (from /proc: Linux) and prints the peak of their sum.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def _tree_rss(root: int) -> int:
    """Sum of VmRSS over ``root`` and every process descended from it."""
    parent, rss = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss[int(d)] = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, [root]
    while frontier:
        nxt = [c for c, pp in parent.items() if pp in frontier and c not in keep]
        keep.update(nxt)
        frontier = nxt
    return sum(rss.get(p, 0) for p in keep)


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    p = subprocess.Popen(cmd)
    peak, t0 = 0, time.time()
    while p.poll() is None:
        peak = max(peak, _tree_rss(p.pid))
        time.sleep(0.2)
    return peak, time.time() - t0, p.returncode


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--out", out, "--no-progress", *extra]
        peak, wall, rc = peak_rss(cmd)
    print(f"fedrec simulate {' '.join(extra) or '(defaults)'}: peak RSS of the process tree {peak / 2**30:.2f} GiB "
          f"over {wall:.0f} s (exit {rc}); target <= 2 GB: {'met' if peak <= 2e9 else 'missed'}")


if __name__ == "__main__":
    main()
