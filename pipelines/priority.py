"""The loader's decoding runs below the thread that iterates it (`decode_nice`, Unix nice values).

On a CPU the thread that iterates the loader also runs the model's step, and the loader's decoders
(DALI's thread pool and executor threads, the torch backend's worker processes) share its cores. The
scheduler splits a core evenly among the threads that want it, so while the decoders fill their
prefetch queue the step runs at a fraction of a core, and once the queue is full the decoders wait
while the step runs alone: neither keeps the cores busy. With the decoders `decode_nice` below, the
step takes its core whenever it can run and the decoders take every cycle it leaves; a step waiting
for data sleeps, so a loader that is the bottleneck still gets the cores. On 2 cores (lip-tiny,
batch 50, 64 px, DALI's CPU graph, one torch thread) lip-train ran +7-8 % samples/s at nice 10 against
0, 5 and 19 the same within the spread (docs/benchmarks.md, "lip-train vs open_clip_train", sixth pass).

The nice value is per thread on Linux (and inherited by the threads and processes a thread starts):
DALI's threads are found by the names DALI gives them (those its pipeline started: another loader's
in the process keep theirs); a loader's worker processes (the torch backend's, DALI's reading ones)
lower every thread of theirs as they start. Raising a thread's nice needs no privilege; nothing here
lowers one. Elsewhere than Linux (no /proc/self/task) DALI's threads are left as they are.
"""
from __future__ import annotations

import os

NICE_MAX = 19
CPU_DEFAULT = 10  # the loader's decoders on a CPU (5 and 19 measured the same on 2 cores)
DALI_THREADS = "[DALI]"  # the prefix of every thread name DALI gives (thread pool, executor, input feeders)


def resolve_nice(nice: int | None, device: str) -> int:
    """`decode_nice` as a loader uses it: None → CPU_DEFAULT on a CPU, 0 on the GPU (its decoders
    are nvJPEG and the step mostly launches kernels: not measured, so left as it is)."""
    if nice is None:
        return CPU_DEFAULT if device == "cpu" else 0
    if not 0 <= nice <= NICE_MAX:
        raise ValueError(f"loader decode_nice must be 0..{NICE_MAX} (how far below the training thread the "
                         f"decoders run; 0: beside it), not {nice}")
    return nice


def thread_ids() -> set[str]:
    """This process's threads now (empty where /proc is missing)."""
    return set(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else set()


def _below_caller(nice: int) -> int:
    """The nice value `nice` below the calling thread's own, at most 19."""
    return min(NICE_MAX, os.getpriority(os.PRIO_PROCESS, 0) + nice)


def _set(tid: str, value: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, int(tid), value)
        return True
    except OSError:  # ended meanwhile, or already further below than asked (set by hand): leave it; a
        return False  # priority is worth a few per cent, never a failed run


def lower_process(nice: int) -> None:
    """Every thread of this process (a loader's worker, as it starts) `nice` below where the calling
    thread runs now; without /proc, the process (0: the whole process elsewhere than Linux)."""
    if nice > 0 and hasattr(os, "setpriority"):  # (not on Windows)
        value = _below_caller(nice)
        for tid in thread_ids() or {"0"}:
            _set(tid, value)


def lower_named_threads(prefix: str, nice: int, besides: set[str] = frozenset()) -> int:
    """Every thread of this process whose name starts with `prefix`, except those in `besides`
    (`thread_ids()` taken before the loader started its own: another loader's keep their value),
    `nice` below the calling thread; the number of threads it lowered (0 where /proc is missing or
    `nice` is 0)."""
    if nice <= 0:
        return 0
    value, found = _below_caller(nice), 0
    for tid in thread_ids() - besides:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith(prefix):
                    continue
        except OSError:  # the thread ended meanwhile (FileNotFoundError or ProcessLookupError, by timing)
            continue
        found += _set(tid, value)
    return found
