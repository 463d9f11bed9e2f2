"""Bad images mid-epoch and elastic resume, for both backends.

The shards are open_clip-style tars made here (jpg + txt, no `.idx`, no manifest): they open
cleanly, so an undecodable JPEG is only met when an epoch reaches it, as in real web data.
Sample i's image is a flat grey of value 4·i, so every delivered image names its sample.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines.errors import SampleError
from pipelines.loader import LoaderConfig, build_loader

N, PER_TAR, BATCH = 48, 12, 4
BACKENDS = ("torch", "dali")


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), (value, value, value)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_tars(folder: Path, bad: set[int], n: int = N) -> Path:
    """n samples in tars of PER_TAR; the images of `bad` are cut to a header (do not decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n // PER_TAR):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(t * PER_TAR, (t + 1) * PER_TAR):
                data = jpeg(4 * i)
                for ext, payload in (("jpg", data[:200] if i in bad else data), ("txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def loader(folder, backend, **kw):
    kw = {"batch_size": BATCH, "image_size": 16, "workers": 1, "split": "train", "flip": False, **kw}
    return build_loader(LoaderConfig(shards=str(folder), format="wds", backend=backend, device="cpu", **kw))


def epoch(ld) -> list[str]:
    return [k for b in ld for k in b.keys]


def expected(ld, bad: set[int]) -> list[str]:
    """The plan's keys with every bad sample replaced by the next good one (cyclically)."""
    out = []
    for g in ld.plan().rank_ids():
        g = int(g)
        while g in bad:
            g = (g + 1) % N
        out.append(f"s{g:04d}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_images_are_substituted_named_and_counted(tmp_path, backend):
    bad = {5, 6, 30}  # 5 and 6 in a row: 5's substitute (6) is bad too, so both become 7
    folder = make_tars(tmp_path / "wds", bad)
    ld = loader(folder, backend, on_error="skip")
    want = expected(ld, bad)
    got = [(k, b) for batch in ld for k, b in zip(batch.keys, batch.images)]
    assert [k for k, _ in got] == want, "the other samples keep their place; bad ones get substitutes"
    for key, image in got:  # the image delivered is the substitute's, not the bad sample's
        value = (image[0].mean() * 0.26862954 + 0.48145466) * 255
        assert abs(float(value) - 4 * int(key[1:])) < 3, key
    assert sorted(ld.bad.found) == sorted(bad)
    assert "00000.tar: sample s0005" in ld.bad.found[5] and "00002.tar: sample s0030" in ld.bad.found[30]
    # The state remembers them: a loader resumed from it substitutes the same way.
    state = ld.state_dict()
    again = loader(folder, backend, on_error="skip")
    again.load_state_dict(state)
    assert sorted(again.bad.found) == sorted(bad)
    want = expected(again, bad)
    assert epoch(again) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_image_raises_naming_shard_and_key(tmp_path, backend):
    folder = make_tars(tmp_path / "wds", {13})
    with pytest.raises(SampleError, match=r"00001\.tar: sample s0013: image does not decode"):
        epoch(loader(folder, backend, shuffle=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_on_one_rank_keep_ranks_equal(tmp_path, backend):
    folder = make_tars(tmp_path / "wds", set())
    rank0 = loader(folder, backend, world_size=2, rank=0)
    bad = {int(g) for g in rank0.plan().rank_ids()[:3]}  # three of rank 0's samples, none of rank 1's
    folder = make_tars(tmp_path / "bad", bad)
    ranks = [loader(folder, backend, world_size=2, rank=r, on_error="skip") for r in (0, 1)]
    sizes = [[len(b) for b in ld] for ld in ranks]
    assert sizes[0] == sizes[1] == [BATCH] * (N // (2 * BATCH))
    assert sorted(ranks[0].bad.found) == sorted(bad) and not ranks[1].bad.found


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_many_bad_in_a_row_is_an_error(tmp_path, backend):
    folder = make_tars(tmp_path / "wds", set(range(8, 12)))
    ok = loader(folder, backend, on_error="skip", shuffle=False, max_bad_in_a_row=4)
    assert len(epoch(ok)) == N
    with pytest.raises(SampleError, match="more than 3 bad samples in a row"):
        epoch(loader(folder, backend, on_error="skip", shuffle=False, max_bad_in_a_row=3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elastic_resume_4_then_2_then_3_ranks(tmp_path, backend):
    """A state saved at world size 4 continues at 2 (and batch 3), then at 3: every sample of
    the epoch's permutation is yielded once until too few remain for a batch on every rank."""
    folder = make_tars(tmp_path / "wds", set(), n=96)

    def ranks(world, batch, state=None):
        out = [loader(folder, backend, world_size=world, rank=r, batch_size=batch, workers=0)
               for r in range(world)]
        for ld in out:
            if state:
                ld.load_state_dict(state)
        return out

    def take(lds, k):
        keys = []
        for ld in lds:
            it = iter(ld)
            keys += [key for _ in range(k) for key in next(it).keys]
            it.close()
        return keys

    order = [f"s{g:04d}" for g in ranks(1, BATCH)[0].plan().order()]
    four = ranks(4, 2)
    seen = take(four, 2)  # 16 samples
    assert sorted(seen) == sorted(order[:16])
    two = ranks(2, 3, four[0].state_dict())
    assert all(len(ld) == (len(order) - 16) // 6 for ld in two)
    seen += take(two, 2)  # 12 more
    assert sorted(seen) == sorted(order[:28])
    three = ranks(3, 2, two[1].state_dict())
    rest = [k for ld in three for k in epoch(ld)]
    seen += rest
    assert len(seen) == len(set(seen)), "a sample came twice"
    assert sorted(seen) == sorted(order[:28 + (len(order) - 28) // 6 * 6])
    # The next epoch is the plain plan for 3 ranks of batch 2.
    fresh = ranks(3, 2)
    for ld in fresh:
        ld.set_epoch(1)
    assert [epoch(ld) for ld in three] == [epoch(ld) for ld in fresh]



@pytest.mark.parametrize("backend", BACKENDS)
def test_len_after_a_resume_counts_what_is_left(tmp_path, backend):
    folder = make_tars(tmp_path / "wds", set())
    first = loader(folder, backend)
    it = iter(first)
    keys = [k for _ in range(2) for k in next(it).keys]
    it.close()
    again = loader(folder, backend)
    again.load_state_dict(first.state_dict())
    assert len(again) == again.batches_per_epoch - 2 == N // BATCH - 2
    rest = epoch(again)
    assert len(rest) == len(again.plan(0).rank_ids()) - len(keys) and not set(rest) & set(keys)
    assert len(again) == again.batches_per_epoch  # the next epoch is whole again


def test_dali_workers_tokenize_after_the_parent_ran_openmp(tmp_path):
    """Untokenized shards are tokenized in DALI's forked source workers; after the training
    process ran a parallel torch op (it always has), a big batch used to deadlock in libgomp."""
    import subprocess
    import sys

    folder = make_tars(tmp_path / "wds", set(), n=240)
    script = ("import sys, torch\n"
              "torch.set_num_threads(2)\n"
              "torch.zeros(4000, 1000).add_(1)\n"
              "from pipelines.loader import LoaderConfig, build_loader\n"
              "ld = build_loader(LoaderConfig(shards=sys.argv[1], backend='dali', batch_size=240,\n"
              "                               image_size=16, workers=2))\n"
              "print(sum(len(b) for b in ld))\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], timeout=120, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.split()[-1] == "240", done.stderr[-2000:]
