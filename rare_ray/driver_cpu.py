"""The driver's CPU seconds, in all and by thread: where a run's driver spends its CPU.

The manifest gives both. The driver's CPU must stay small next to the run's wall time, and
when it does not, the split says whose it is: Ray Data's executors (one scheduling loop per
stage's execution, in a thread named after it), their iterators, the stages' own threads
(commits, reading the parts written), the main thread, native threads that Python does not
know (Ray's core worker, gRPC, Arrow's and the S3 client's pools), by the name the kernel
gives them (``native: <name>``), and what is left: threads that ended between samples.

Threads are sampled from ``/proc/self/task`` every ``interval`` seconds (Linux; elsewhere only
the total is given), so a thread's last ``interval`` before it ends goes to the remainder.
"""

from __future__ import annotations

import os
import re
import threading
import time
from types import TracebackType

# Ray Data names an execution's threads after its dataset ("<name>_<id>_<n>"): the id goes.
_DATASET_ID = re.compile(r"_[0-9A-Za-z]{16,}_\d+$")
# Python's default names ("Thread-7 (target)") and numbered threads ("iter_threaded_3").
_NUMBERED = re.compile(r"^Thread-\d+ \((.*)\)$|[-_]\d+$")
REMAINDER = "ended threads"
NATIVE = "native: "


def thread_group(name: str) -> str:
    """``name`` without what differs between threads of the same role."""
    name = _DATASET_ID.sub("", name)
    return _NUMBERED.sub(lambda m: m.group(1) or "", name)


def _thread_stat(tid: int, ticks: int) -> tuple[float, int] | None:
    """A thread's CPU seconds and its start time (in ticks since boot: with the id, it tells
    a thread from a later one that got the same id), or None if it has ended."""
    # os.open and os.read, not open(): a few threads' worth of Python's file objects each
    # second would cost the sampler more than the reading itself.
    try:
        fd = os.open(f"/proc/self/task/{tid}/stat", os.O_RDONLY)
    except OSError:  # ended since it was listed
        return None
    try:
        fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
    except OSError:
        return None
    finally:
        os.close(fd)
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[19])  # utime+stime, start


def _native_name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return NATIVE + f.read().strip()
    except OSError:
        return NATIVE + "?"


class DriverCPU:
    """Measures this process's CPU from entering to ``seconds()``; ``by_thread()`` splits it."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._start = time.process_time()
        # Per thread (its id and start time: Linux reuses the ids of ended threads): its
        # name, its CPU when first seen, and when last seen.
        self._seen: dict[tuple[int, int], tuple[str, float, float]] = {}
        self._lock = threading.Lock()  # the sampler's thread and ``by_thread``'s caller
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> DriverCPU:
        self._start = time.process_time()
        if os.path.isdir("/proc/self/task"):
            self._sample(initial=True)
            self._sampler = threading.Thread(
                target=self._run, name="rare-ray-driver-cpu", daemon=True
            )
            self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, initial: bool = False) -> None:
        """Each live thread's CPU now; a thread first seen after the start counts from 0."""
        ticks = os.sysconf("SC_CLK_TCK")
        python = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        with self._lock:
            for tid in map(int, os.listdir("/proc/self/task")):
                stat = _thread_stat(tid, ticks)
                if stat is None:
                    continue
                cpu, started = stat
                key = (tid, started)
                if key not in self._seen:
                    name = python.get(tid) or _native_name(tid)
                    self._seen[key] = (name, cpu if initial else 0.0, cpu)
                else:
                    name, first, _ = self._seen[key]
                    # A Python thread is listed by the kernel a moment before by Python: one
                    # first seen in that moment gets its Python name at the next sample.
                    if name.startswith(NATIVE) and tid in python:
                        name = python[tid]
                    self._seen[key] = (name, first, cpu)

    def seconds(self) -> float:
        return time.process_time() - self._start

    def by_thread(self) -> dict[str, float]:
        """CPU seconds per group of threads (``thread_group``), largest first, and the
        remainder; they add up to ``seconds()``. Empty where threads cannot be sampled."""
        if self._sampler is None:
            return {}
        self._sample()
        total = self.seconds()
        groups: dict[str, float] = {}
        with self._lock:
            seen = list(self._seen.values())
        for name, first, last in seen:
            group = thread_group(name)
            groups[group] = groups.get(group, 0.0) + last - first
        groups[REMAINDER] = max(0.0, total - sum(groups.values()))
        return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
