from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real image-caption sets of `../shared/data` (see its README.md); skip when absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def build_synthetic_shards(root: Path, n: int, formats: str, per_shard: int) -> Path:
    """`n` synthetic 64-px images with synthetic captions, tokenized, converted to `formats`
    under `root/shards/<format>`: the project's own data, so tests using it never skip."""
    from tools import make_shards, make_synthetic

    syn = root / "syn"
    assert make_synthetic.main(["--out", str(syn), "--train", str(n), "--test", "0", "--size", "64",
                                "--workers", "1"]) == 0
    out = root / "shards"
    assert make_shards.main(["--source", "table", "--input", str(syn / "train.jsonl"),
                             "--image-column", "image", "--caption-column", "caption",
                             "--synthetic-captions", str(syn / "train_syn.jsonl"), "--tokenize",
                             "--format", formats, "--samples-per-shard", str(per_shard), "--out", str(out),
                             "--workers", "1", "--quiet"]) == 0
    return out
