"""Wall time and peak memory of a command and all its child processes (Linux /proc, no psutil).

Shared by the speed benchmarks. The command runs as a subprocess; a polling loop sums the
resident memory of the whole process tree (so `-np 2` worker processes count) every
`interval` seconds and keeps the largest sum. Anonymous memory (RssAnon: what the process
allocated) and file-backed pages (RssFile: memory-mapped files, reclaimable page cache)
are kept apart, because an aggregator that maps its inputs shows them as RssFile.

The same loop keeps the command's own process apart (its peak, e.g. a coordinator next to the
worker processes it starts), the largest number of processes in the tree, and the CPU time of
every process it saw (/proc/<pid>/stat, last value seen): a process that is never waited for,
such as a Ray worker, is missing from the rusage CPU time but counted there. A sampled peak
misses spikes shorter than the interval (training a site for a few seconds has ~0.2 s spikes),
so the largest one caught grows with the number of spikes; the kernel's own peak of each
process (VmHWM, RSS including mapped files) has no such gap and is kept too.
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
    root_peak_rss_mb: float = 0.0       # largest VmRSS of the command's own process
    root_peak_anon_mb: float = 0.0      # largest RssAnon of the command's own process
    peak_processes: int = 0             # most processes alive in the tree at once
    tree_cpu_seconds: float = 0.0       # user + system CPU of every process seen (sampled)
    root_hwm_mb: float = 0.0            # the command's own peak RSS as the kernel keeps it (VmHWM): exact
    largest_hwm_mb: float = 0.0         # the largest VmHWM of any process in the tree
    sum_hwm_mb: float = 0.0             # sum of every process's VmHWM: an upper bound of the tree's peak RSS


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


def _memory_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, VmHWM) of a process in kB; zeros once it is gone."""
    rss = anon = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, anon, hwm


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2:].split()   # the name may hold spaces: split after it
    return int(fields[11]) + int(fields[12])


@dataclass
class _Peaks:
    """What the polling loop keeps between samples (kB, ticks)."""

    rss: int = 0
    anon: int = 0
    root_rss: int = 0
    root_anon: int = 0
    processes: int = 0
    ticks: dict[int, int] | None = None
    hwm: dict[int, int] | None = None   # pid -> VmHWM, with `with_cpu` (the kernel's own peak: no sampling gap)

    def sample(self, root: int, with_cpu: bool) -> None:
        rss = anon = 0
        tree = _tree(root)
        for p in tree:
            r, a, h = _memory_kb(p)
            rss, anon = rss + r, anon + a
            if with_cpu and h:
                self.hwm = self.hwm or {}
                self.hwm[p] = max(self.hwm.get(p, 0), h)
            if p == root:
                self.root_rss, self.root_anon = max(self.root_rss, r), max(self.root_anon, a)
            if with_cpu:
                self.ticks = self.ticks or {}
                self.ticks[p] = max(self.ticks.get(p, 0), _cpu_ticks(p))
        self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
        self.processes = max(self.processes, len(tree))


def run_measured(
    cmd: list[str], env: dict | None = None, interval: float = 0.005, check: bool = True, timeout: float = 600.0,
    tree_cpu: bool = False,
) -> Measured:
    """Run `cmd`, polling the memory of its process tree; raise on a non-zero exit when `check`.

    After `timeout` seconds the command's whole process group is killed (exit code -9). With
    `tree_cpu`, every sample also keeps each process's CPU time and kernel-kept peak RSS
    (`Measured.tree_cpu_seconds`, `root_hwm_mb`, `largest_hwm_mb`, `sum_hwm_mb`)."""
    # output goes to files, not pipes: a chatty command must never block on a full pipe
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        peaks = _Peaks()
        returncode, cpu = _poll(proc, interval, start + timeout, peaks, tree_cpu)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {returncode}:\n{stderr[-3000:]}")
    tree_cpu_seconds = sum((peaks.ticks or {}).values()) / os.sysconf("SC_CLK_TCK")
    hwm = peaks.hwm or {}
    return Measured(seconds, peaks.rss / 1024, peaks.anon / 1024, cpu, returncode, stdout, stderr,
                    peaks.root_rss / 1024, peaks.root_anon / 1024, peaks.processes, tree_cpu_seconds,
                    hwm.get(proc.pid, 0) / 1024, max(hwm.values(), default=0) / 1024, sum(hwm.values()) / 1024)


def _poll(proc: subprocess.Popen, interval: float, deadline: float, peaks: _Peaks, tree_cpu: bool) -> tuple[int, float]:
    """(exit code, CPU seconds), the peaks into `peaks`; reaps the process itself (os.wait4) to
    get its CPU time, which is less disturbed by other jobs than wall time."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        peaks.sample(proc.pid, tree_cpu)
        if time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: only the command's processes
        time.sleep(interval)


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine is shared; a high load slows every figure)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
