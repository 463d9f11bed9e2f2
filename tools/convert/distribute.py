"""Where make-shards runs its shard tasks: inline, a local process pool, or Ray.

Every distributor runs the same task, `convert_shard(shard, items, job)`, over the shards the
orchestrator hands it and yields each finished shard's record in completion order; the shard's
bytes depend only on its slice of the input, so the output is the same whichever one ran it.

Workers die with the process that started them (a SIGKILLed, OOM-killed or preempted make-shards
must not leave workers holding memory): pool workers ask the kernel for SIGKILL when their parent
dies (Linux `prctl(PR_SET_PDEATHSIG)`) and also poll their parent pid (every platform); a local
Ray cluster that make-shards started is watched by a forked reaper (`tools/convert/reaper.py`) that kills
every process of that cluster once the pipe make-shards holds open closes. A worker killed mid-shard leaves only
`*.tmp` files, which --resume deletes: a shard counts as done only once its completion record,
written last, names files of the recorded sizes.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from typing import Iterable, Iterator

from pipelines.text import load_tokenizer
from tools.convert.reaper import start_reaper, stop_reaper
from tools.convert.shard_worker import ShardJob, WorkItem, convert_shard, init_worker

DISTRIBUTORS = ("local", "ray")
PARENT_POLL_S = 0.5
RAY_TASK_RETRIES = 3  # a killed worker (OOM, preemption) or a transient OSError: run the shard again

Task = tuple[int, list[WorkItem]]


class DistributorError(Exception):
    """The distributor cannot run (Ray missing, cluster unreachable): one line naming the fix."""


class Distributor(ABC):
    """Runs shard tasks; `map_unordered` yields the completion record of each finished shard."""

    window = 1  # tasks in flight: enough to keep every worker busy, few enough to bound memory

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    def map_unordered(self, tasks: Iterable[Task]) -> Iterator[dict]:
        pending: list = []
        for shard, items in tasks:
            pending.append(self._submit(shard, items))
            while len(pending) >= self.window:
                done, pending = self._wait_any(pending)
                yield from done
        while pending:
            done, pending = self._wait_any(pending)
            yield from done

    @abstractmethod
    def _submit(self, shard: int, items: list[WorkItem]):
        """Start one task; return its handle."""

    @abstractmethod
    def _wait_any(self, pending: list) -> tuple[list[dict], list]:
        """Block until at least one task is done: (their records, the handles still pending)."""


class Inline(Distributor):
    """`--workers 1`: convert in this process, no workers to start or to orphan."""

    def __init__(self, job: ShardJob):
        self.job = job

    def _submit(self, shard, items):
        return convert_shard(shard, items, self.job)

    def _wait_any(self, pending):
        return pending, []


class LocalPool(Distributor):
    """Forked worker processes on this machine (the default)."""

    def __init__(self, job: ShardJob, workers: int):
        self.job, self.window = job, 2 * workers
        if job.tokenize or "rec" in job.formats:
            load_tokenizer()  # once, before the fork, instead of once per worker
        # fork: workers inherit what the main process has loaded.
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"),
                                           initializer=init_pool_worker, initargs=(os.getpid(),))

    def _submit(self, shard, items):
        return self.pool.submit(convert_shard, shard, items, self.job)

    def _wait_any(self, pending):
        done, rest = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        return [f.result() for f in done], list(rest)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def init_pool_worker(parent_pid: int) -> None:
    init_worker()
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    """Exit when `parent_pid` is gone. PR_SET_PDEATHSIG is immediate but Linux-only (and tied to
    the forking thread); polling getppid() — which changes once we are reparented — covers the rest."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: a half-written shard stays *.tmp

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


class RayCluster(Distributor):
    """Shards as Ray tasks: on the Ray this process already joined, on the cluster asked for
    (`address`, else the RAY_ADDRESS variable: what `ray job submit` sets for its drivers), or else
    on a local Ray of `workers` CPUs started here and stopped (with every process it spawned) with
    us. Without an ask it never joins a cluster: `ray.init(address="local")`, because Ray's own
    default (address None) joins whatever the node's address file names (a `ray start` cluster,
    or a stale file of a killed one) and then refuses the local CPU count.
    `--out` must be a folder every node sees at the same path (a shared file system)."""

    def __init__(self, job: ShardJob, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise DistributorError("--distributor ray needs Ray, which is not installed: "
                                   "pip install '.[ray]'") from e
        self.ray, self.owned, self.reaper = ray, False, None
        address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's convention for "join this"
        if not ray.is_initialized():
            if address is None:
                self.reaper = start_reaper()
            try:
                local = {"num_cpus": workers, "_node_ip_address": "127.0.0.1"} if address is None else {}
                ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                         **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                self.close()
                raise DistributorError(f"cannot start or reach Ray at {address or 'a new local cluster'}: "
                                       f"{e}; check --ray-address (host:port of the head node)") from e
            self.owned = True
        self.window = 2 * max(1, int(ray.cluster_resources().get("CPU", workers)))
        self.task = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES,
                               retry_exceptions=[OSError])(convert_shard)
        self.job_ref = ray.put(job)

    def _submit(self, shard, items):
        return self.task.remote(shard, items, self.job_ref)

    def _wait_any(self, pending):
        done, rest = self.ray.wait(pending, num_returns=1)
        try:
            return self.ray.get(done), rest
        except self.ray.exceptions.RayTaskError as e:
            for ref in rest:  # the run fails: stop the others rather than let them finish unseen
                self.ray.cancel(ref, force=True)
            raise e.as_instanceof_cause() from None  # the worker's own error, one line in main()

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()
            self.owned = False
        if self.reaper is not None:
            stop_reaper(*self.reaper)
            self.reaper = None


def make_distributor(name: str, job: ShardJob, workers: int, ray_address: str | None = None) -> Distributor:
    if name == "ray":
        return RayCluster(job, workers, ray_address)
    return LocalPool(job, workers) if workers > 1 else Inline(job)
