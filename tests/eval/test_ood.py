"""OOD retrieval (train/eval/ood.py, train/eval/ood_sets.py): every library corruption and text perturbation is
seeded, shape- and dtype-preserving, identity at severity 0 and a change at 1-5, at MM_Robustness's
rates (pixelate on the 224-px square); the AUROC helper on hand cases; run_ood's
clean numbers equal the plain retrieval evaluation's with a tiny random open_clip model; write_ood's
files; lip-eval --ood end to end."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from train.eval import cli, evaluate as ev
from train.eval import ood, ood_sets
from train.eval.evaluate import RetrievalEvalConfig, RetrievalEvaluator

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = [["a red dog runs on the grass", "the dog is red"], ["two cats sleep on a sofa"],
            ["a man rides a bike down the street", "cyclist in a city"], ["a bowl of fruit on a table"]]
LONG = "A small brown dog is running quickly across the green grass in the park near the old river bank"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a tiny random open_clip model `lip-ood-tiny`, its checkpoint, its config file)."""
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "lip-ood-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(folder / "lip-ood-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("lip-ood-tiny", pretrained=None).eval()
    torch.save(model.state_dict(), folder / "tiny.pt")
    return model, str(folder / "tiny.pt"), str(folder / "lip-ood-tiny.json")


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> str:
    """A Karpathy-style JSON of 4 textured 40x48 images (textured: blur and contrast change them)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(len(CAPTIONS)):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    rows = [{"image": f"{i}.png", "caption": caps} for i, caps in enumerate(CAPTIONS)]
    (root / "test.json").write_text(json.dumps(rows))
    return str(root / "test.json")


def texture(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


# ------------------------------------------------------------------ the library sets (train/eval/ood_sets.py)

# Corruptions whose result does not depend on random draws (a seed cannot change them).
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate"}


@pytest.mark.parametrize("name", ood_sets.IMAGE_CORRUPTIONS)
def test_every_corruption_changes_images_and_is_seeded(name):
    x = texture()
    assert ood_sets.corrupt(x, name, 0, seed=1) is x  # severity 0: the input itself
    outs = []
    for s in range(1, 6):
        y = ood_sets.corrupt(x, name, s, seed=1)
        assert y.dtype == np.uint8 and y.shape == x.shape
        assert not np.array_equal(y, x), (name, s)
        assert np.array_equal(y, ood_sets.corrupt(x, name, s, seed=1))  # same seed, same image
        outs.append(y)
    assert not np.array_equal(outs[0], outs[-1])
    assert np.array_equal(x, texture())  # the input is not changed in place
    if name not in DETERMINISTIC:
        assert not np.array_equal(ood_sets.corrupt(x, name, 3, seed=1), ood_sets.corrupt(x, name, 3, seed=2))


def test_corruptions_are_the_library_s_and_pixelate_is_on_the_224_square():
    import cv2
    import imagecorruptions
    assert set(ood_sets.IMAGE_CORRUPTIONS) == set(imagecorruptions.get_corruption_names("all"))
    x = texture()
    with ood_sets.seeded(7):  # the library itself, under the same seed: the same image
        ref = imagecorruptions.corrupt(x, severity=2, corruption_name="gaussian_noise")
    assert np.array_equal(ood_sets.corrupt(x, "gaussian_noise", 2, seed=7), ref)
    side = int(224 * 0.25)  # MM_Robustness: the 224-px square at factor c, back to the image's size
    small = cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA)
    want = cv2.resize(small, (48, 40), interpolation=cv2.INTER_AREA)
    assert np.array_equal(ood_sets.corrupt(x, "pixelate", 5), want)


def test_seeded_gives_the_global_states_back():
    import random
    random.seed(5)
    np.random.seed(5)
    py, npy = random.random(), np.random.random()
    random.seed(5)
    np.random.seed(5)
    ood_sets.corrupt(texture(), "snow", 3, seed=1)
    ood_sets.perturb_text(LONG, "keyboard", 3, seed=1)
    assert (random.random(), np.random.random()) == (py, npy)


def test_corrupt_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown corruption"):
        ood_sets.corrupt(texture(), "rain", 1)
    with pytest.raises(ValueError, match="uint8"):
        ood_sets.corrupt(texture().astype(np.float32), "jpeg_compression", 1)


def words(text: str) -> list[str]:
    return text.replace(" ", "")  # nlpaug re-joins punctuation: compare without spaces


@pytest.mark.parametrize("name", ood_sets.TEXT_PERTURBATIONS)
def test_every_text_perturbation_changes_its_input_and_is_seeded(name):
    assert ood_sets.perturb_text(LONG, name, 0, seed=3) == LONG
    for s in range(1, 6):
        out = ood_sets.perturb_text(LONG, name, s, seed=3)
        assert out == ood_sets.perturb_text(LONG, name, s, seed=3)
        assert out != LONG and (words(out) != words(LONG) or name == "word_swap"), (name, s, out)
    outs = {ood_sets.perturb_text(LONG, name, 5, seed=k) for k in range(4)}
    assert len(outs) > 1  # the seed matters
    assert ood_sets.perturb_text("", name, 5, 3) == ""


def test_text_rates_are_mm_robustness_s():
    n = len(LONG.split())
    for s in (1, 5):  # nlpaug's RandomWordAug deletes ceil(0.05·s·n) words, 1 to its default aug_max 10
        out = ood_sets.perturb_text(LONG, "word_delete", s, seed=0)
        assert len(out.split()) == n - min(10, max(1, math.ceil(0.05 * s * n)))
    marks = sum(w in ood_sets.PUNCTUATIONS for w in ood_sets.perturb_text(LONG, "insert_punctuation", 5, 0).split())
    assert 1 <= marks <= int(0.25 * n + 1)


def test_presets_and_left_out():
    assert set(ood_sets.PRESETS["elip"]) <= set(ood_sets.CORRUPTIONS) and ood_sets.PRESETS["full"] == ood.CORRUPTIONS
    assert len(ood_sets.IMAGE_CORRUPTIONS) == 19 and len(ood_sets.TEXT_PERTURBATIONS) == 9
    assert any("WordNet" in why for why in ood_sets.LEFT_OUT.values())
    assert ood_sets.mix_seed(0, "jpeg", 1, 2) != ood_sets.mix_seed(0, "jpeg", 1, 3) != ood_sets.mix_seed(1, "jpeg", 1, 2)


def test_a_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setattr(ood_sets, "_IC", None)
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "imagecorruptions.corruptions", None)
    with pytest.raises(ood_sets.MissingExtra, match=r"pip install -e '\.\[ood\]'"):
        ood_sets.corrupt(texture(), "fog", 1)
    with pytest.raises(ev.EvalConfigError, match="imagecorruptions"):
        ood.run_ood(None, "unused.json", None, 32, "cpu", corruptions=["fog"])


# ------------------------------------------------------------------ AUROC

def test_auroc_hand_cases():
    assert ood.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert ood.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert ood.auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5
    assert ood.auroc(torch.tensor([0.3, 0.5, 0.3]), torch.tensor([True, True, False])) == 0.75  # a tie: half
    assert np.isnan(ood.auroc([0.1, 0.2], [False, False]))


def test_ood_metrics_top1_matches_recall():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])  # texts 0,1 -> image 0; 2 -> 1; 3 -> 2
    m = ood.ood_metrics(img, txt, [0, 0, 1, 2], logit_scale=5.0, i2t_u="all")
    assert m["i2t_R@1"] == pytest.approx(100 / 3) and m["t2i_R@1"] == 25.0
    # i2t over all captions: image 0 is right, 1 (no evidence: u = 0.5) and 2 are wrong; 2 is as sure as 0
    # (a tie: half)
    assert m["auroc_u_i2t_all"] == 0.75 and 0 < m["mean_u_i2t_all"] < 1 and "auroc_u_i2t" not in m
    assert m["auroc_u_t2i"] == 0.5  # every text sees one cos-1 image: all tied


def _caption_groups(counts, dim=8, seed=0):
    """Unit-norm features of len(counts) images and sum(counts) captions near their image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(len(counts), dim, generator=g), dim=-1)
    t2i = [i for i, c in enumerate(counts) for _ in range(c)]
    txt = torch.nn.functional.normalize(img[t2i] + 0.9 * torch.randn(len(t2i), dim, generator=g), dim=-1)
    return img, txt, t2i


def test_reference_i2t_candidates_are_one_own_caption_per_image_but_the_last():
    t2i = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    chosen = ood.reference_i2t_candidates(t2i, seed=3)
    assert len(chosen) == 3 and [t2i[c] for c in chosen] == [0, 1, 2]  # image 3: none
    assert ood.reference_i2t_candidates(t2i, seed=3) == chosen  # seeded
    drawn = {c for seed in range(40) for c in ood.reference_i2t_candidates(t2i, seed)}
    assert drawn == set(range(6))  # every caption of images 0-2 can be drawn, none of image 3's
    assert ood.reference_i2t_candidates([1, 0, 1, 0], seed=0)[0] in (1, 3)  # captions in any order


def test_reference_i2t_u_is_elip_compute_entropy():
    """heliossun/ELIP train_retrieval.py `compute_entropy`, transcribed in float64 numpy with its
    random draw replaced by ours: α = exp(100·cos) + 1 over one caption per image for images
    0 … N − 2, u = N / S for every image; its reported mean is over the images whose top-1 (over
    all captions) is right. t2i: N / S over all N images, as before."""
    img, txt, t2i = _caption_groups([5] * 7)
    per_query: dict = {}
    m = ood.ood_metrics(img, txt, t2i, per_query=per_query, seed=5, i2t_u="both")
    n = img.shape[0]
    scores = (img @ txt.T).double().numpy()
    chosen = ood.reference_i2t_candidates(t2i, seed=5)
    assert chosen == [5 * i + (c - 5 * i) for i, c in enumerate(chosen)] and len(chosen) == n - 1
    u_ref = n / (np.exp(scores * 100) + 1)[:, chosen].sum(axis=1)
    np.testing.assert_allclose(per_query["u_i2t"], u_ref, rtol=1e-12)
    right = ~np.array(per_query["wrong_i2t"])
    assert 0 < right.sum() < n
    assert m["u_right_i2t"] == pytest.approx(u_ref[right].mean(), rel=1e-12)  # the reference's figure
    u_all = 5 * n / (np.exp(scores * 100) + 1).sum(axis=1)
    np.testing.assert_allclose(per_query["u_i2t_all"], u_all, rtol=1e-12)
    assert not np.allclose(u_ref, u_all, rtol=0.1, atol=0)  # the two statistics differ
    u_t2i = n / (np.exp(scores.T * 100) + 1).sum(axis=1)
    np.testing.assert_allclose(per_query["u_t2i"], u_t2i, rtol=1e-12)
    assert set(ood.METRIC_KEYS) | set(ood.ALL_CAPTION_KEYS) == set(m)
    default = ood.ood_metrics(img, txt, t2i, seed=5)  # ELIP's by default, its keys only
    assert set(default) == set(ood.METRIC_KEYS) and default["u_right_i2t"] == m["u_right_i2t"]
    assert ood.ood_metrics(img, txt, t2i, seed=6)["mean_u_i2t"] != m["mean_u_i2t"]  # another draw
    # one image: ELIP's statistic has no candidate (NaN), the rest is defined
    one = ood.ood_metrics(img[:1], txt[:5], [0] * 5)
    assert math.isnan(one["mean_u_i2t"]) and one["i2t_R@1"] == 100.0
    with pytest.raises(ev.EvalConfigError, match="i2t_u"):
        ood.ood_metrics(img, txt, t2i, i2t_u="one")


# ------------------------------------------------------------------ runs

def test_run_ood_clean_equals_plain_evaluation(tiny, karpathy, capsys):
    model = tiny[0]
    plain = RetrievalEvaluator(RetrievalEvalConfig("t", karpathy_json=karpathy, image_size=32, batch_size=3,
                                                   workers=0)).run(model)
    res = ood.run_ood(model, karpathy, None, 32, "cpu", corruptions=["gaussian_noise", "word_swap"],
                      severities=(0, 1, 5), batch_size=3)
    assert list(res) == ["clean", "gaussian_noise", "word_swap"] and list(res["word_swap"]) == [0, 1, 5]
    for key, value in plain.items():
        assert res["clean"][0][key] == value and res["gaussian_noise"][0][key] == value
    assert set(res["clean"][0]) == set(ood.METRIC_KEYS)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 + 2 * 3  # one progress line per run
    again = ood.run_ood(model, karpathy, None, 32, "cpu", corruptions=["gaussian_noise", "word_swap"],
                        severities=(5,), batch_size=3, progress=False)
    for name in ("gaussian_noise", "word_swap"):  # as JSON: NaN (no wrong t2i top-1?) equals NaN there
        assert json.dumps(again[name][5]) == json.dumps(res[name][5])
    with pytest.raises(ev.EvalConfigError, match="unknown OOD corruption"):
        ood.run_ood(model, karpathy, None, 32, "cpu", corruptions=["rain"])


def test_write_ood_files(tiny, karpathy, tmp_path):
    res = ood.run_ood(tiny[0], karpathy, None, 32, "cpu", severities=(2,), progress=False)  # all, once
    assert list(res) == ["clean", *ood.CORRUPTIONS]
    res["clean"][0]["auroc_u_i2t"] = float("nan")  # a model never wrong: written as null, shown as –
    md, js, png = ood.write_ood(res, str(tmp_path / "o"))
    table = open(md).read()
    assert table.startswith("| corruption | kind | I2T R@1") and "| clean | clean |" in table and "–" in table
    assert "| pixelate | image |" in table and "| char_swap | text |" in table and "| frost | image |" in table
    assert len(table.splitlines()) == 2 + 1 + len(ood.CORRUPTIONS) + 1 + 2 + 1 + len(ood.CORRUPTIONS)
    data = json.loads(open(js).read())
    assert data["clean"]["0"]["auroc_u_i2t"] is None and set(data["jpeg_compression"]) == {"2"}
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert ood.to_markdown_ood(data) == table  # the table again from the JSON (str keys, null)


def test_cli_ood(tiny, karpathy, tmp_path, capsys):
    _, ckpt, cfg = tiny
    argv = ["--checkpoint", ckpt, "--model", "lip-ood-tiny", "--model-config", cfg, "--retrieval-json", karpathy,
            "--image-size", "32", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "r.json"),
            "--ood", "--ood-corruptions", "jpeg_compression,char_delete", "--ood-severities", "2", "--evidential-scale", "learned"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert list(data) == ["clean", "jpeg_compression", "char_delete"]
    plain = json.loads((tmp_path / "r.json").read_text())["tiny.pt"]["retrieval"]
    assert data["clean"]["0"]["rsum"] == plain["rsum"]
    out = capsys.readouterr().out
    assert (tmp_path / "ood" / "ood.png").is_file() and "| jpeg_compression | image |" in out
    assert "image→text u (reference): ELIP's" in out and "u right I2T (ELIP)" in out and "all captions" not in out
    per_query = json.loads((tmp_path / "ood" / "uncertainty_per_query.json").read_text())
    n_images = len(json.loads(open(karpathy).read()))
    assert len(per_query["u_i2t"]) == len(per_query["wrong_i2t"]) == n_images
    # ELIP's i2t u divides N images by an S over N − 1 captions: up to N / (N − 1)
    assert all(0 < u <= n_images / (n_images - 1) for u in per_query["u_i2t"])
    assert all(0 < u <= 1 for u in per_query["u_t2i"])
    assert sum(per_query["wrong_i2t"]) / n_images == pytest.approx(1 - plain["i2t_R@1"] / 100, abs=1e-6)
    assert cli.main(argv[:6] + ["--ood"]) == 2 and "--ood needs --retrieval-json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(argv + ["--ood-corruptions", "rain"])
    assert cli.main(argv + ["--ood-i2t-u", "both", "--ood-out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "u right I2T (ELIP)" in out and "u right I2T (all captions)" in out
    both = json.loads((tmp_path / "both" / "ood.json").read_text())["clean"]["0"]
    assert {"auroc_u_i2t", "auroc_u_i2t_all"} <= set(both) and both["auroc_u_t2i"] == data["clean"]["0"]["auroc_u_t2i"]
