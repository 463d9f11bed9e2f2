"""tools/demo/demo.py and tools/demo/noise_sweep.py reporting: mean ± std over seeds, the target checks, the
sweep table and plot, from made-up rows (training itself is covered by test_learning.py)."""
from __future__ import annotations

import pytest

from tools.demo import demo, noise_sweep


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
    assert not any("passed by the gate" in c for c in checks)  # rows without the margin record
    gated = [{**r, "passed_swap": 0.25, "passed_clean": 0.95, "auc_train_gate_margin": 0.9}
             if r["variant"] == "alip" else r for r in ROWS]
    checks = demo.check_targets(gated)
    assert "alip language gate AUC (training-time S_tc − H_tc) >= 0.90: 0.900: yes" in checks
    assert checks[-1] == ("alip W_s = 1 (passed by the gate, tied) for 25 % of swapped and 95 % of clean "
                          "raw texts in the final epoch")


def test_sweep_table_and_plot(tmp_path):
    rows = ROWS + [_row(v, 0, 3.0, swap=0.0) for v in demo.MODES]
    text = noise_sweep.sweep_table(rows, [0.0, 0.5], list(demo.MODES))
    lines = text.splitlines()
    assert lines[2].startswith("| 0 | 3.0 ± 0.0") and lines[2].endswith("| – |")  # no swaps: no AUC
    assert lines[3].startswith("| 0.5 | 2.0 ± 1.0 | 6.0 ± 1.0 | 21.0 ± 1.0 | 0.800 / 0.950 |")
    png = noise_sweep.plot(rows, [0.0, 0.5], list(demo.MODES), str(tmp_path / "sweep.png"), "test")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.endswith("sweep.png")


@pytest.mark.slow  # data, a base run and six variant runs with their evaluations: ~8 s
def test_demo_variants_end_to_end_tiny(tmp_path):
    """make demo-variants at toy scale: 96 images, 2 steps per run; every row present, the
    trainable shares as the tuning sets them, OOD figures for full vs evidential fine-tuning."""
    import json

    from tools.demo import demo_variants

    raw, train_dir = tmp_path / "demo" / "raw", tmp_path / "demo" / "train"
    demo.make_data(str(raw), 96, 12, 0.5, 1)
    demo.convert(str(raw), str(train_dir), "wds", 1)
    shards = str(train_dir / "wds")
    demo.train_and_evaluate("clip-both", 0, shards, str(raw), str(tmp_path / "base"), 2, 0,
                            ["data.batch_size=32"], gate_auc=False)
    runs = tmp_path / "variants"
    assert demo_variants.main(["--out", str(tmp_path / "demo"), "--runs", str(runs), "--base",
                               str(tmp_path / "base" / "clip-both"), "--finetune-steps", "2",
                               "--scratch-steps", "2", "--workers", "0", "--ood-severities", "3",
                               "--set", "data.batch_size=32"]) == 0
    rows = {r["variant"]: r for r in json.loads((runs / "variants.json").read_text())}
    assert set(rows) == {"ft-full", "ft-lit", "ft-lilt", "ft-evidential", "clip-both", "pruned"}
    assert rows["ft-full"]["trainable_pct"] == 100 and rows["ft-lilt"]["trainable_pct"] < rows["ft-lit"]["trainable_pct"] < 100
    assert 0 < rows["ft-evidential"]["trainable_pct"] < rows["ft-lit"]["trainable_pct"]  # ELIP: adapters only
    for name in ("ft-full", "ft-evidential"):
        assert 0 <= rows[name]["ood_image_R@1"] <= 100 and (runs / name / "ood" / "ood.png").is_file()
    assert "| pruned |" in (runs / "variants.md").read_text()
    # the evidential row: ELIP's runnable optimiser settings, validated, its best beside the last
    from train.config import load_config

    ev = load_config(str(runs / "ft-evidential" / "config.yaml"))
    assert (ev.optim.lr, ev.optim.weight_decay, ev.optim.betas, ev.optim.eps, ev.optim.clip_grad) == \
        (5e-5, 0.02, (0.9, 0.999), 1e-8, 5.0) and ev.loss.kl_anneal_epochs == 20 and ev.run.keep_best == "r_mean"
    assert load_config(str(runs / "ft-full" / "config.yaml")).optim.lr == 5e-4  # --finetune-lr's default
    row = rows["ft-evidential"]
    assert (row["best_epoch"], row["best_step"]) == (0, 2) and row["epochs"] == 2 / 3  # 96 // 32 batches
    assert 0 <= row["best_mean_R@1"] <= 100 and "best_epoch" not in rows["ft-full"]
