"""Process-group set-up from the environment torchrun provides (nanoGPT's way)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipelines.loader_settings import resolve_device
from pipelines.parent_watch import watch_parent


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """NCCL on GPU, gloo on CPU; a plain single process when torchrun did not launch us."""
    use_cuda = resolve_device(device) == "gpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.device=gpu but no CUDA device is visible; use data.device=cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A rank torchrun started: torchrun stops its ranks when it ends cleanly, but SIGKILLed (the
        # OOM killer, a preemption) it leaves them training on, writing checkpoints into the run a
        # restart resumes. A rank ends within a second of its agent instead.
        watch_parent(os.getppid())
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": dev} if use_cuda else {}))
    return DistEnv(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
