"""Opening a folder in object storage costs two requests (manifest.json and index.bin) whether it
is named by its format folder (`…/cc3m/wds`) or by the make-shards --out prefix (`…/cc3m`), and
one (the manifest) on the node's next open (issue 26, fault 9: the prefix cost a 404 first)."""
from __future__ import annotations

import pytest

from conftest import build_synthetic_shards
from pipelines.storage import remote as storage
from pipelines.shardset import ShardSet
from s3_server import s3  # noqa: F401 - the module-scoped server fixture
from test_storage import upload_folder


@pytest.fixture(scope="module")
def prefix(s3, tmp_path_factory):  # noqa: F811
    """A make-shards --out folder (wds and rec) uploaded as make-shards --out s3:// lays it out."""
    out = build_synthetic_shards(tmp_path_factory.mktemp("prefixed"), 12, "wds,rec", 4)
    url = s3.url("prefixed")
    upload_folder(out, url)
    return url


def opened(s3, url: str, fmt: str, cache: str) -> list[str]:  # noqa: F811
    before = len(s3.requests)
    shards = ShardSet(url, fmt, cache_dir=cache)
    try:
        assert len(shards) == 12
    finally:
        shards.close()
    return [f"{method} {path.split('?')[0].rsplit('/', 2)[-2]}/{path.split('?')[0].rsplit('/', 1)[-1]}"
            for method, path in s3.requests[before:]]


@pytest.mark.parametrize("fmt", ["wds", "rec"])
@pytest.mark.parametrize("by", ["prefix", "format folder"])
def test_opening_by_prefix_or_format_folder_costs_two_requests(s3, prefix, tmp_path, fmt, by):  # noqa: F811
    url = prefix if by == "prefix" else storage.join(prefix, fmt)
    first = opened(s3, url, fmt, str(tmp_path))
    assert first == [f"GET {fmt}/manifest.json", f"GET {fmt}/index.bin"], first
    assert opened(s3, url, fmt, str(tmp_path)) == [f"GET {fmt}/manifest.json"]
