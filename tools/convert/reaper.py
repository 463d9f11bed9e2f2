"""A forked reaper: once the process that started it exits, however (SIGKILL, OOM, preemption), it
takes down every process that process started after it (in make-shards: a local Ray cluster; in
bench-convert, bench-train, bench-scale and the demo: the tools they launch, with their workers).

Ray's own clean-up misses some after a SIGKILLed driver (its dashboard and runtime-env agents lived on
for a minute and more, measured). Finding them by an environment variable alone is not enough
either: those agents rewrite their process title over the start of their environment block, which
is what /proc/<pid>/environ shows, so the mark can vanish (seen in 2 of 6 runs). The reaper therefore
knows them two ways: it follows the run's process tree while the run lives (every TRACK_S, by
/proc/<pid>/stat: parent and start time, so a reused pid is never taken for a tracked one), and it
reads the environment mark. At the end it stops what it found with SIGSTOP, looks again for their
children (a stopped process spawns nothing; a child of a stopped one still names it as parent), and
only then SIGKILLs them all. Linux only (/proc); elsewhere it does nothing and Ray's reaper is all
there is.

Processes the run already had before the reaper started (and their descendants), such as a server
a test started, are never touched.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import uuid

SESSION_ENV = "MAKE_SHARDS_RAY_SESSION"  # marks every process of a local Ray cluster we start
TRACK_S = 0.2
ROUNDS = 50  # stop, look again: until no new process shows up

Table = dict[int, tuple[int, int, bytes]]  # pid -> (parent pid, start time in ticks, state)


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/<pid>/stat's fields from the state on (field 3: [0] state, [1] parent, [11] utime,
    [12] stime, [19] start time), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone meanwhile
        return None
    return stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and ')'


def process_table() -> Table:
    table: Table = {}
    try:
        names = os.listdir("/proc")
    except FileNotFoundError:
        return table
    for name in names:
        if name.isdigit() and (fields := stat_fields(name)) is not None:
            table[int(name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def descendants(table: Table, roots: set[int], exclude: set[int]) -> set[int]:
    """`roots` and every process below them, not descending into `exclude`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in found or pid in exclude:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def marked(table: Table, mark: bytes) -> set[int]:
    pids = set()
    for pid in table:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    pids.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def start_reaper() -> tuple[int, int]:
    """Fork the reaper; mark the environment every process started from now on inherits.
    Returns (reaper pid, the write end of the pipe whose closing tells the reaper we are gone)."""
    token = uuid.uuid4().hex
    owner = os.getpid()
    table = process_table()
    before = {(pid, table[pid][1]) for pid in descendants(table, {owner}, set()) - {owner}}
    owner_start = table[owner][1] if owner in table else -1
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reaper: system calls only, nothing of the parent's state
        try:
            os.close(write_end)
            os.setsid()  # out of our process group: a group kill or Ctrl-C must not take it along
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            reap((owner, owner_start), before, read_end, f"{SESSION_ENV}={token}".encode())
        finally:
            os._exit(0)
    os.close(read_end)
    os.environ[SESSION_ENV] = token
    return pid, write_end


def stop_reaper(pid: int, write_end: int) -> None:
    """The run's normal end: the reaper sweeps up what Ray's shutdown left, then exits."""
    os.environ.pop(SESSION_ENV, None)
    os.close(write_end)
    os.waitpid(pid, 0)


@contextlib.contextmanager
def reaped():
    """A block whose subprocesses (and theirs) die with this process, however it ends: what the
    benchmarks wrap around each tool they launch (img2dataset's pool would go on converting, a
    trainer would finish its epoch, after a SIGKILLed benchmark)."""
    pid, write_end = start_reaper()
    try:
        yield
    finally:
        stop_reaper(pid, write_end)


def reap(owner_id: tuple[int, int], before: set[tuple[int, int]], read_end: int, mark: bytes) -> None:
    me, (owner, owner_start) = os.getpid(), owner_id
    known: dict[int, int] = {}  # pid -> start time, of every process the run started

    def excluded(table: Table) -> set[int]:
        return {me} | {pid for pid, start in before if table.get(pid, (0, -1))[1] == start}

    while not select.select([read_end], [], [], TRACK_S)[0]:  # readable only at EOF: nobody writes
        table = process_table()
        for pid in descendants(table, {owner}, excluded(table)) - {owner}:
            known[pid] = table[pid][1]
    stopped: dict[int, int] = {}
    for _ in range(ROUNDS):
        table = process_table()
        roots = {pid for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}
        roots |= marked(table, mark)
        _, start, state = table.get(owner, (0, -1, b"Z"))
        if start == owner_start and state != b"Z":  # a normal end: the run lives, and so may its children
            roots |= descendants(table, {owner}, excluded(table)) - {owner}
        new = {pid: table[pid][1] for pid in descendants(table, roots, excluded(table))
               if pid not in stopped and table[pid][2] != b"Z"}
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except OSError:
                continue
        stopped.update(new)
    table = process_table()
    for pid, start in stopped.items():
        if table.get(pid, (0, -1))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
