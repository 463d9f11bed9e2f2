"""Kill anywhere, rerun, compare (tests/kill_harness.py): every tool and output kind, killed by
SIGKILL at a few of its points (metadata writes, uploads, shard starts) and at a random time, then
rerun: the output equals an uninterrupted run's byte for byte and every caption is on its own image.
`python -m tests.kill_harness --points 200 --random 10` sweeps every point there is."""
from __future__ import annotations

import random

import pytest

from kill_harness import Harness, build_inputs, loopback_store, scenarios

# scenario -> (kill points, random kills): a few each, spread over the kinds of points (plan,
# records, manifests, uploads, shard starts); the sweep is the command line's.
PLAN = {
    "make-shards/pool/local": (2, 1),
    "make-shards/pool/s3": (1, 0),
    "caption-shards": (1, 0),
    "attach-captions/in-place": (2, 0),
    "attach-captions/out": (1, 1),
}
# Ray: one kill of a run on its own local Ray writing to s3:// (a killed Ray run resumed into a
# folder is test_distributed_convert's).
SLOW_PLAN = {"make-shards/ray/s3": (1, 0)}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only waits
    root = tmp_path_factory.mktemp("kill")
    data, shards, model = build_inputs(root)
    with loopback_store(True) as store:
        yield Harness(root / "runs", data, store), {s.name: s for s in scenarios(data, shards, model)}
    torch.set_num_threads(threads)


def sweep(harness, name: str, points: int, randoms: int) -> None:
    h, found = harness
    tally = h.sweep(found[name], points, randoms, random.Random(name))
    assert tally.points >= 10, f"{name}: only {tally.points} points found"
    assert tally.killed_at_points == points and tally.reruns_equal == points + randoms
    assert tally.samples_checked > 0


@pytest.mark.parametrize("name", sorted(PLAN))
def test_killed_anywhere_the_rerun_gives_the_clean_output(harness, name):
    sweep(harness, name, *PLAN[name])


@pytest.mark.slow  # the killed runs start a local Ray each: ~10 s
@pytest.mark.parametrize("name", sorted(SLOW_PLAN))
def test_killed_on_ray_the_rerun_gives_the_clean_output(harness, name):
    pytest.importorskip("ray")
    sweep(harness, name, *SLOW_PLAN[name])
