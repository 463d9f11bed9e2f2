"""Helper processes that end with the process that started them, however it ended.

A loader's worker processes (DALI's external-source workers, forked or spawned; torch DataLoader
workers; the folder index's process pool) wait on queues their parent feeds. When the parent is
SIGKILLed (the OOM killer, a preemption, `scancel`) nothing closes those queues: forked siblings
hold the same pipe ends, DALI's shared-memory queues have no end at all, so a worker asleep on
its queue never wakes (issue 26: DALI's stayed for good, ~650 MB each, holding shared memory).

`watch_parent()` starts one daemon thread in the helper that looks at its parent pid every
POLL_S seconds and exits the process once the parent is gone (the helper was re-parented).
Polling, not Linux's PR_SET_PDEATHSIG: that signal fires when the *thread* that forked the helper
exits, and a loader's pipeline may be built by a thread that ends while the loader lives on. It
works in any PID namespace and on any POSIX system, and costs one getppid() per POLL_S.
"""
from __future__ import annotations

import multiprocessing
import os
import threading

POLL_S = 0.5
_watched: tuple[int, int] | None = None  # (this process, the parent it watches)


def expected_parent() -> int:
    """The pid of the process that started this one: recorded by multiprocessing before the fork
    or spawn (so a parent that died before we looked is still recognised as gone), else getppid."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def watch_parent(parent: int | None = None, poll_s: float = POLL_S) -> None:
    """In a helper process: exit (status 1, no clean-up: the parent that would want one is gone)
    within `poll_s` of `parent` (default: `expected_parent()`) ending. Idempotent per process."""
    global _watched
    parent = expected_parent() if parent is None else parent
    if _watched == (os.getpid(), parent):
        return
    _watched = (os.getpid(), parent)
    if os.getppid() != parent:  # gone already, between our start and now
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, poll_s), name="lip-parent-watch", daemon=True).start()


def _watch(parent: int, poll_s: float) -> None:
    stop = threading.Event()  # never set: a sleep that is not time.sleep (tests may patch that)
    while os.getppid() == parent:
        stop.wait(poll_s)
    os._exit(1)


def watch_in_child(_obj=None, *_) -> None:
    """`watch_parent()` shaped as a hook: multiprocessing.util.register_after_fork's callback
    (called with the registered object), DataLoader's worker_init_fn (with the worker id),
    ProcessPoolExecutor's initializer (with nothing)."""
    watch_parent()
