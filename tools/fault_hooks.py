"""Test hooks: kill or hold the offline tools at named points, so tests can prove that a run
killed anywhere is finished by rerunning it. Inert unless MAKE_SHARDS_FAULT_DIR names a folder
(tests set it for the processes they start; nothing else should).

Files in that folder arm the hooks:
- `kill-<shard>`: the first worker that claims it dies by SIGKILL before converting that shard, as
  the OOM killer takes one worker (Ray runs the task again).
- `hold-<shard>`: while it exists, that shard waits (a run that cannot end before a test kills it).
- `at-<point id>`: the first process to pass that point SIGKILLs the tool's main process (named by
  MAKE_SHARDS_FAULT_MAIN_PID, which the test's launcher sets) and then itself: the whole run dies
  at that instant, wherever the point is (a pool worker, a Ray task, the main process).
- `log`: while it exists, every point passed is appended to it as `<monotonic s> <pid> <point>`,
  which is how a test lists the points of a run.
Points: `write <path>` and `wrote <path>` around the rename of every atomic metadata write
(`pipelines.formats.base.write_atomic`), `upload <url>` and `uploaded <url>` around every upload of
`make-shards --out s3://`, and `shard <stem>` / `caption <shard>` / `attach <shard path>` where a
worker starts on a shard. Each file is claimed by renaming it to `*.fired`: exactly one process acts.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time

from pipelines.formats import base

FAULT_DIR_ENV = "MAKE_SHARDS_FAULT_DIR"
MAIN_PID_ENV = "MAKE_SHARDS_FAULT_MAIN_PID"
LOG_FILE = "log"
HOLD_POLL_S = 0.05


def point_id(point: str) -> str:
    """The name a test arms a point under (points hold paths, file names cannot)."""
    return hashlib.sha1(point.encode("utf-8")).hexdigest()[:20]


def _claim(path: str) -> bool:
    try:
        os.rename(path, path + ".fired")  # atomic: exactly one process claims it
    except FileNotFoundError:
        return False
    return True


def kill_run() -> None:
    """SIGKILL the tool's main process, then this one: nothing runs on after the point."""
    main = os.environ.get(MAIN_PID_ENV)
    if main and int(main) != os.getpid():
        try:
            os.kill(int(main), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Pass the point `name`: log it, and kill the run here when a test armed it."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return
    log = os.path.join(folder, LOG_FILE)
    if os.path.exists(log):
        line = f"{time.monotonic():.6f} {os.getpid()} {name}\n".encode("utf-8")
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)  # one write per line: lines of several processes never interleave
        finally:
            os.close(fd)
    if _claim(os.path.join(folder, f"at-{point_id(name)}")):
        kill_run()


def shard_fault(stem: str) -> None:
    """At the start of shard `stem`: wait while `hold-<stem>` exists, die if `kill-<stem>` is armed
    (this worker only), then pass the point `shard <stem>`."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return
    while os.path.exists(os.path.join(folder, f"hold-{stem}")):
        time.sleep(HOLD_POLL_S)
    if _claim(os.path.join(folder, f"kill-{stem}")):
        os.kill(os.getpid(), signal.SIGKILL)
    point(f"shard {stem}")


def _on_atomic_write(phase: str, path: str) -> None:
    point(f"{phase} {path}")


base.atomic_write_hook = _on_atomic_write
