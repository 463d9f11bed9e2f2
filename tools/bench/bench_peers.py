"""Peers for bench-convert and bench-loader: Mosaic Streaming (MDS) and LitData, on our images.

Writers (bench-convert): each peer gets the same work per image as make-shards, our
`process_image` (the same decode, resize and encode) so that the rows compare the writers and
their parallelism, not the resize: Mosaic's `MDSWriter` is single-process, so a fork pool of
`--workers` converts and the writer appends in the main process (how its docs parallelise);
LitData's `optimize(num_workers=..., start_method="fork")` runs the same function in its own
workers (fork: its default, spawn, pays ~20 s of worker start-up on 2 cores).

    python -m tools.bench.bench_peers convert --writer mds --table T.jsonl --out DIR --workers 2 --resize 256

prints one JSON line: {"written": n, "seconds": conversion without interpreter start-up}.

Readers (bench-loader): the wds shards are exported once into each peer's format (key, jpg
bytes, caption), then read by the peer's own dataset and loader with our torch baseline's
decode + torchvision augmentation and the caption tokenized in the workers. `resume_check`
stops a loader mid-epoch, restores a fresh one from its state_dict and compares the keys.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from tools.convert.image_policy import ImagePolicy, SkipSample, process_image

WRITERS = ("mds", "litdata")
READERS = ("mosaic", "litdata")
COLUMNS = {"key": "str", "jpg": "bytes", "txt": "str"}


# ---------------------------------------------------------------- writers (bench-convert)

def _convert(item: tuple[str, str, str], policy: ImagePolicy) -> dict | None:
    key, path, caption = item
    try:
        image = process_image(Path(path).read_bytes(), policy)
    except SkipSample:
        return None  # counted by the caller as not written, as make-shards counts it
    return {"key": key, "jpg": image.data, "txt": caption}


def _litdata_convert(item, policy):
    sample = _convert(item, policy)
    if sample is not None:  # a generator: LitData skips items that yield nothing
        yield sample


def read_table(table: Path) -> list[tuple[str, str, str]]:
    """(key, image path, caption) of a make-shards JSONL table (what bench-convert writes)."""
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    return [(f"{i:07d}", r["image"], r["caption"]) for i, r in enumerate(rows)]


def write_mds(items, out: str, policy: ImagePolicy, workers: int) -> int:
    from streaming import MDSWriter

    convert = functools.partial(_convert, policy=policy)
    written = 0
    with mp.get_context("fork").Pool(workers) as pool, MDSWriter(out=out, columns=COLUMNS) as writer:
        for sample in tqdm(pool.imap(convert, items, chunksize=16), total=len(items), desc="MDSWriter",
                           unit=" img", mininterval=2, file=sys.stderr, disable=None):
            if sample is not None:
                writer.write(sample)
                written += 1
    return written


def write_litdata(items, out: str, policy: ImagePolicy, workers: int) -> int:
    from litdata import optimize

    optimize(fn=functools.partial(_litdata_convert, policy=policy), inputs=items, output_dir=out,
             num_workers=workers, chunk_bytes="64MB", mode="overwrite", verbose=False,
             start_method="fork")  # its default, spawn, costs ~20 s of worker start-up here
    index = json.loads((Path(out) / "index.json").read_text())
    return sum(c["chunk_size"] for c in index["chunks"])


def convert_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_peers convert")
    p.add_argument("--writer", choices=WRITERS, required=True)
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resize", type=int)
    p.add_argument("--quality", type=int, default=95)
    a = p.parse_args(argv)
    items = read_table(a.table)
    __import__("streaming" if a.writer == "mds" else "litdata")  # its import is start-up
    t0 = time.perf_counter()  # after the imports of this module: start-up stays out, as for make-shards
    write = write_mds if a.writer == "mds" else write_litdata
    written = write(items, os.path.abspath(a.out), ImagePolicy(a.resize, a.quality), a.workers)
    print(json.dumps({"written": written, "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


# ---------------------------------------------------------------- readers (bench-loader)

def _shard_items(folder: str) -> list[tuple[str, bytes, str]]:
    from pipelines.shardset import ShardSet

    shards = ShardSet(folder, "wds")
    out = []
    for gid in range(len(shards)):
        s = shards.get(gid)
        out.append((s.key, bytes(s.image), s.txt))
    shards.close()
    return out


def _identity(sample: dict):
    yield sample


def export(folder: str, dest: str, reader: str) -> str:
    """The wds shards in `folder` as `reader`'s dataset under `dest` (written once, then reused)."""
    target = os.path.join(dest, reader)
    if os.path.exists(os.path.join(target, "index.json")):
        return target
    samples = [{"key": k, "jpg": b, "txt": t} for k, b, t in _shard_items(folder)]
    if reader == "mosaic":
        from streaming import MDSWriter

        # Small shards, so that a few hundred test images still spread over several shards.
        with MDSWriter(out=target, columns=COLUMNS, size_limit=1 << 22) as w:
            for s in samples:
                w.write(s)
    else:
        from litdata import optimize

        # start_method: optimize sets it process-wide (force=True); its default, spawn, would then
        # also start every later DataLoader's workers.
        optimize(fn=_identity, inputs=samples, output_dir=os.path.abspath(target), num_workers=1,
                 chunk_bytes="4MB", verbose=False, start_method="fork")
    return target


class PeerSample:
    """Item → (image tensor, raw tokens, key): our torch baseline's decode and augmentation, and
    the caption tokenized per sample in the worker, as open_clip's loader does."""

    def __init__(self, image_size: int):
        from pipelines.backends.torch_loader import torchvision_transform
        from pipelines.augment.transforms import AugmentSpec

        self.transform = torchvision_transform(AugmentSpec(size=image_size, train=True))

    def __call__(self, item: dict):
        import torch

        from pipelines.augment.images import decode_rgb
        from pipelines.text import tokenize

        return (self.transform(decode_rgb(item["jpg"])), torch.from_numpy(tokenize([item["txt"]])[0]).long(),
                item["key"])


@functools.lru_cache(maxsize=1)
def _mosaic_class():
    from streaming import StreamingDataset

    class MosaicImages(StreamingDataset):
        def __init__(self, sample: PeerSample, **kw):
            super().__init__(**kw)
            self.sample = sample

        def __getitem__(self, i):
            return self.sample(super().__getitem__(i))
    return MosaicImages


def _fork(workers: int) -> dict:
    """Workers forked, as our torch loader's are (Linux's default, unless something changed it)."""
    return {"multiprocessing_context": "fork"} if workers > 0 else {}


def open_peer(reader: str, location: str, batch_size: int, workers: int, image_size: int,
              cache: str | None = None, seed: int = 0):
    """(loader, close) of `reader` over `location` (a local folder, or s3:// with `cache`)."""
    sample = PeerSample(image_size)
    if reader == "mosaic":
        from streaming import StreamingDataLoader
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a previous loader's registry of its local folder
        remote, local = (location, cache) if location.startswith("s3://") else (None, location)
        ds = _mosaic_class()(sample, remote=remote, local=local, batch_size=batch_size, shuffle=True,
                             shuffle_seed=seed)
        loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True,
                                     **_fork(workers))  # workers per epoch, as the torch and litdata rows
    else:
        from litdata import StreamingDataLoader, StreamingDataset

        opts = None
        if location.startswith("s3://"):
            opts = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
            if opts["endpoint_url"].startswith("http://"):
                # LitData 0.2.76 fetches chunks with obstore, whose client options it fixes itself
                # without allow_http: a plain-http loopback server is refused (BadScheme) unless
                # they allow it. Set before the workers fork, so they inherit it; real S3 is https.
                import litdata.streaming.downloader as lit_downloader

                lit_downloader._OBSTORE_CLIENT_OPTIONS = {**lit_downloader._OBSTORE_CLIENT_OPTIONS,
                                                          "allow_http": True}
        ds = StreamingDataset(location, cache_dir=cache, shuffle=True, drop_last=True, seed=seed,
                              transform=sample, storage_options=opts)
        loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True,
                                     **_fork(workers))

    def close() -> None:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if reader == "mosaic":
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
    return loader, close


def peer_epochs(loader) -> Callable[[], Iterator[int]]:
    def epoch() -> Iterator[int]:
        for images, tokens, _keys in loader:
            if tuple(tokens.shape) != (len(images), 77):
                raise RuntimeError(f"peer batch of {len(images)} came with tokens {tuple(tokens.shape)}")
            yield len(images)
    return epoch


def resume_check(make: Callable[[], tuple], keys: Callable, stop_after: int) -> dict:
    """Run one epoch whole; then a fresh loader stopped after `stop_after` batches, its
    state_dict given to another fresh loader that runs on. Exact: the keys before the stop and
    after the restore are the uninterrupted epoch's, in order (same seed)."""
    def run(loader, limit=None, state=None):
        if state is not None:
            loader.load_state_dict(state)
        got = []
        for i, batch in enumerate(loader):
            got += list(keys(batch))
            if limit is not None and i + 1 == limit:
                break
        return got

    loader, close = make()
    full = run(loader)
    close()
    loader, close = make()
    before = run(loader, stop_after)
    state = loader.state_dict()
    close()
    loader, close = make()
    t = time.perf_counter()
    try:
        after = run(loader, state=state)
    except Exception as e:  # noqa: BLE001 - a peer that cannot resume is a finding, not a crash
        close()
        return {"exact": False, "error": f"{type(e).__name__}: {e}"[:300], "epoch_samples": len(full)}
    close()
    resumed = before + after
    return {"exact": resumed == full, "epoch_samples": len(full), "before_stop": len(before),
            "after_restore": len(after), "repeated": len(resumed) - len(set(resumed)),
            "missing": len(set(full) - set(resumed)), "restore_to_end_s": round(time.perf_counter() - t, 2)}


# ---------------------------------------------------------------- loopback S3 (bench-loader --s3)

LOOPBACK_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
LOOPBACK_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@contextlib.contextmanager
def loopback_s3(bucket: str = "bench") -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), `bucket` created, the AWS variables (and
    Mosaic's S3_ENDPOINT_URL) pointing at it while the context is open; yields its endpoint.
    tests/s3_server.py puts its fault-injecting proxy in front of this one."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**LOOPBACK_ENV, "AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint}  # Mosaic reads the last
    saved = {k: os.environ.get(k) for k in (*env, *LOOPBACK_CLEARED)}
    os.environ.update(env)
    for k in LOOPBACK_CLEARED:
        os.environ.pop(k, None)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload(folder: str, url: str) -> str:
    """Every file under `folder` to the same relative keys under `url`; returns `url`."""
    from pipelines.storage.remote import upload_file

    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not rel.startswith("."):  # make-shards' .parts: not part of the dataset
                upload_file(os.path.join(root, name), f"{url}/{rel}")
    return url


if __name__ == "__main__":
    if sys.argv[1:2] != ["convert"]:
        sys.exit("usage: python -m tools.bench.bench_peers convert --writer mds|litdata ...")
    sys.exit(convert_main(sys.argv[2:]))
