"""tools/demo.py and tools/noise_sweep.py reporting: mean ± std over seeds, the target checks, the
sweep table and plot, from made-up rows (training itself is covered by test_learning.py)."""
from __future__ import annotations

import pytest

from tools import demo, noise_sweep


def _row(variant: str, seed: int, r1: float, swap: float = 0.5, **extra) -> dict:
    return {"variant": variant, "seed": seed, "swap": swap, "i2t_R@1": r1, "t2i_R@1": r1, "mean_R@1": r1,
            "rsum": 10 * r1, "seconds": 1.0, **extra}


ROWS = [_row("clip-raw", s, 1 + s) for s in (0, 1, 2)] + [_row("clip-both", s, 5 + s) for s in (0, 1, 2)] \
    + [_row("alip", s, 20 + s, auc_language_gate=0.8, auc_train_w_sample=0.95) for s in (0, 1, 2)]


def test_summarize_is_mean_and_sample_std():
    assert demo.summarize(ROWS[:3], "mean_R@1") == pytest.approx((2.0, 1.0))
    assert demo.summarize(ROWS[:1], "mean_R@1") == (1.0, 0.0)
    assert demo.summarize(ROWS[:3], "auc_language_gate") is None


def test_table_shows_mean_and_std_over_seeds():
    text = demo.table(ROWS, list(demo.MODES))
    assert "| alip | 21.0 ± 1.0 |" in text and "| clip-raw | 2.0 ± 1.0 |" in text
    assert "| – |" in demo.table(ROWS, ["clip-raw"])  # no gate AUC for an ungated mode
    one_seed = demo.table([r for r in ROWS if r["seed"] == 0], list(demo.MODES))
    assert "±" not in one_seed


def test_target_checks_name_each_claim():
    checks = demo.check_targets(ROWS)
    assert checks[0].endswith("yes") and checks[1].endswith("yes")  # order on RSUM and mean R@1
    assert "clip-both mean R@1 >= 10 %: 6.0: NO" in checks
    assert any("training-time W_s" in c and c.endswith("yes") for c in checks)


def test_sweep_table_and_plot(tmp_path):
    rows = ROWS + [_row(v, 0, 3.0, swap=0.0) for v in demo.MODES]
    text = noise_sweep.sweep_table(rows, [0.0, 0.5], list(demo.MODES))
    lines = text.splitlines()
    assert lines[2].startswith("| 0 | 3.0 ± 0.0") and lines[2].endswith("| – |")  # no swaps: no AUC
    assert lines[3].startswith("| 0.5 | 2.0 ± 1.0 | 6.0 ± 1.0 | 21.0 ± 1.0 | 0.800 / 0.950 |")
    png = noise_sweep.plot(rows, [0.0, 0.5], list(demo.MODES), str(tmp_path / "sweep.png"), "test")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.endswith("sweep.png")
