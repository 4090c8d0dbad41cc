"""Wall time and peak memory of a command and all its child processes (Linux /proc, no psutil).

Shared by the speed benchmarks. The command runs as a subprocess; a polling loop sums the
resident memory of the whole process tree (so `-np 2` worker processes count) every
`interval` seconds and keeps the largest sum. Anonymous memory (RssAnon: what the process
allocated) and file-backed pages (RssFile: memory-mapped files, reclaimable page cache)
are kept apart, because an aggregator that maps its inputs shows them as RssFile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    seconds: float
    peak_rss_mb: float          # largest sum of VmRSS over the process tree
    peak_anon_mb: float         # largest sum of RssAnon over the process tree
    cpu_seconds: float          # user + system CPU of the process and every child it waited for
    returncode: int
    stdout: str
    stderr: str


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(c) for c in text.split())
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _rss_kb(pid: int) -> tuple[int, int]:
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    except OSError:
        pass
    return rss, anon


def run_measured(
    cmd: list[str], env: dict | None = None, interval: float = 0.005, check: bool = True, timeout: float = 600.0
) -> Measured:
    """Run `cmd`, polling the memory of its process tree; raise on a non-zero exit when `check`.

    After `timeout` seconds the command's whole process group is killed (exit code -9)."""
    # output goes to files, not pipes: a chatty command must never block on a full pipe
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        peak_rss, peak_anon, returncode, cpu = _poll(proc, interval, start + timeout)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {returncode}:\n{stderr[-3000:]}")
    return Measured(seconds, peak_rss / 1024, peak_anon / 1024, cpu, returncode, stdout, stderr)


def _poll(proc: subprocess.Popen, interval: float, deadline: float) -> tuple[int, int, int, float]:
    """(peak RSS kB, peak anonymous kB, exit code, CPU seconds); reaps the process itself
    (os.wait4) to get its CPU time, which is less disturbed by other jobs than wall time."""
    peak_rss = peak_anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return peak_rss, peak_anon, proc.returncode, usage.ru_utime + usage.ru_stime
        rss = anon = 0
        for p in _tree(proc.pid):
            r, a = _rss_kb(p)
            rss, anon = rss + r, anon + a
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: only the command's processes
        time.sleep(interval)


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine is shared; a high load slows every figure)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
