import contextlib
import io
import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real image-caption sets of `../shared/data` (see its README.md); skip when absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def synthetic_input(syn: Path, n: int, size: int = 64) -> list[str]:
    """`n` synthetic images with synthetic captions in `syn`; returns make-shards' input arguments."""
    from tools.demo import make_synthetic

    assert make_synthetic.main(["--out", str(syn), "--train", str(n), "--test", "0", "--size", str(size),
                                "--workers", "1"]) == 0
    return ["--source", "table", "--input", str(syn / "train.jsonl"), "--image-column", "image",
            "--caption-column", "caption", "--synthetic-captions", str(syn / "train_syn.jsonl")]


def build_synthetic_shards(root: Path, n: int, formats: str, per_shard: int) -> Path:
    """`n` synthetic 64-px images with synthetic captions, tokenized, converted to `formats`
    under `root/shards/<format>`: the project's own data, so tests using it never skip."""
    from tools.convert import make_shards

    out = root / "shards"
    assert make_shards.main(synthetic_input(root / "syn", n) + [
        "--tokenize", "--format", formats, "--samples-per-shard", str(per_shard), "--out", str(out),
        "--workers", "1", "--quiet"]) == 0
    return out


def overrides(shards: str, out_dir, name: str, **changes) -> list[str]:
    """Dotted overrides for a tiny CPU training run (`lip-tiny`, 3 steps); `changes` use `__` for
    the dot (optim__lr=1e-3)."""
    values = {"data.train_shards": shards, "data.backend": "torch", "data.image_size": 64, "data.batch_size": 16,
              "data.workers": 0, "model.name": "lip-tiny", "optim.warmup_steps": 2, "optim.max_steps": 3,
              "run.out_dir": str(out_dir), "run.name": name, "run.log_every": 1, "run.plots": "false"}
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [f"{k}={v}" for k, v in values.items()]


def run_main(argv: list[str]) -> dict:
    """`train.main.main(argv)` in-process; its last stdout line is the run's JSON summary."""
    from train.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return json.loads(stdout.getvalue().strip().splitlines()[-1])
