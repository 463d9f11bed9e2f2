"""OOD retrieval (train/ood.py): image corruptions and text perturbations are seeded, shape- and
dtype-preserving, identity at severity 0 and a change at 1-5; the AUROC helper on hand cases; run_ood's
clean numbers equal the plain retrieval evaluation's with a tiny random open_clip model; write_ood's
files; lip-eval --ood end to end."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from train import evaluate as ev
from train import ood
from train.evaluate import RetrievalEvalConfig, RetrievalEvaluator

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


def texture(seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, 40, 48), dtype=np.uint8))


# ------------------------------------------------------------------ corruptions

@pytest.mark.parametrize("name", list(ood.SEVERITIES))
def test_corruptions_change_images_and_keep_shape(name):
    x = texture()
    assert ood.corrupt(x, name, 0, seed=1) is x  # severity 0: the input itself
    outs = []
    for s in range(1, 6):
        y = ood.corrupt(x, name, s, seed=1)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        assert not torch.equal(y, x), (name, s)
        assert torch.equal(y, ood.corrupt(x, name, s, seed=1))  # same seed, same image
        outs.append(y)
    assert not torch.equal(outs[0], outs[-1])
    assert torch.equal(x, texture())  # the input is not changed in place


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise"])
def test_noise_depends_on_seed_and_grows_with_severity(name):
    x = texture()
    assert not torch.equal(ood.corrupt(x, name, 3, seed=1), ood.corrupt(x, name, 3, seed=2))
    err = [(ood.corrupt(x, name, s, seed=1).float() - x.float()).abs().mean() for s in range(1, 6)]
    assert all(a < b for a, b in zip(err, err[1:]))


def test_brightness_and_contrast_follow_imagenet_c():
    black = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert (ood.corrupt(black, "brightness", 5) == round(0.5 * 255)).all()  # V 0 -> grey 0.5
    x = torch.tensor([100, 50, 0], dtype=torch.uint8)[:, None, None].expand(3, 2, 2).contiguous()
    y = ood.corrupt(x, "brightness", 1).flatten(1)[:, 0].float()  # V 100/255 + 0.1: RGB scaled alike
    assert torch.allclose(y, torch.tensor([100 + 25.5, 50 + 12.75, 0]), atol=0.5)
    assert torch.equal(ood.corrupt(x, "contrast", 5), x)  # every channel constant: its own mean


def test_corrupt_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown corruption"):
        ood.corrupt(texture(), "fog", 1)
    with pytest.raises(ValueError, match="uint8"):
        ood.corrupt(texture().float(), "jpeg", 1)


# ------------------------------------------------------------------ text

@pytest.mark.parametrize("name", ood.TEXT_PERTURBATIONS)
def test_text_perturbations_are_seeded(name):
    vocab = ood.vocabulary([LONG, "zebra yacht"])
    assert ood.perturb_text(LONG, name, 0, seed=3, vocab=vocab) == LONG
    for s in range(1, 6):
        assert ood.perturb_text(LONG, name, s, 3, vocab) == ood.perturb_text(LONG, name, s, 3, vocab)
    out = ood.perturb_text(LONG, name, 5, 3, vocab)
    assert out != LONG
    assert out != ood.perturb_text(LONG, name, 5, 4, vocab)
    if name.startswith("word"):  # 0.1 * 5 of the words
        n = round(0.5 * len(LONG.split()))
        assert len(out.split()) == len(LONG.split()) + {"delete": -n, "insert": n, "repeat": n}.get(name[5:], 0)
    assert ood.perturb_text("", name, 5, 3, vocab) == ""


def test_text_perturbation_details():
    assert ood.vocabulary(["A dog, a Cat.", "dog"]) == ["a", "cat", "dog"]
    assert set(ood.KEYBOARD["a"]) == set("qwsz") and set(ood.KEYBOARD["g"]) == set("tyfhvb")
    out = ood.perturb_text("HELLO", "char_keyboard", 1, seed=0)  # one edit, case kept
    assert sum(a != b for a, b in zip(out, "HELLO")) == 1 and out.isupper()
    assert ood.perturb_text("dog", "word_delete", 5, seed=0) == "dog"  # one word always stays
    assert ood.mix_seed(0, "jpeg", 1, 2) != ood.mix_seed(0, "jpeg", 1, 3) != ood.mix_seed(1, "jpeg", 1, 2)


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
    m = ood.ood_metrics(img, txt, [0, 0, 1, 2], logit_scale=5.0)
    assert m["i2t_R@1"] == pytest.approx(100 / 3) and m["t2i_R@1"] == 25.0
    # i2t: image 0 is right, 1 (no evidence: u = 0.5) and 2 are wrong; 2 is as sure as 0 (a tie: half)
    assert m["auroc_u_i2t"] == 0.75 and 0 < m["mean_u_i2t"] < 1
    assert m["auroc_u_t2i"] == 0.5  # every text sees one cos-1 image: all tied


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
        ood.run_ood(model, karpathy, None, 32, "cpu", corruptions=["fog"])


def test_write_ood_files(tiny, karpathy, tmp_path):
    res = ood.run_ood(tiny[0], karpathy, None, 32, "cpu", severities=(2,), progress=False)  # all, once
    assert list(res) == ["clean", *ood.CORRUPTIONS]
    res["clean"][0]["auroc_u_i2t"] = float("nan")  # a model never wrong: written as null, shown as –
    md, js, png = ood.write_ood(res, str(tmp_path / "o"))
    table = open(md).read()
    assert table.startswith("| corruption | kind | I2T R@1") and "| clean | clean |" in table and "–" in table
    assert "| pixelate | image |" in table and "| char_swap | text |" in table
    assert len(table.splitlines()) == 2 + 1 + len(ood.CORRUPTIONS) + 1 + 2 + 1 + len(ood.CORRUPTIONS)
    data = json.loads(open(js).read())
    assert data["clean"]["0"]["auroc_u_i2t"] is None and set(data["jpeg"]) == {"2"}
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert ood.to_markdown_ood(data) == table  # the table again from the JSON (str keys, null)


def test_cli_ood(tiny, karpathy, tmp_path, capsys):
    _, ckpt, cfg = tiny
    argv = ["--checkpoint", ckpt, "--model", "lip-ood-tiny", "--model-config", cfg, "--retrieval-json", karpathy,
            "--image-size", "32", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "r.json"),
            "--ood", "--ood-corruptions", "jpeg,char_delete", "--ood-severities", "2", "--evidential-scale", "learned"]
    assert ev.main(argv) == 0
    data = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert list(data) == ["clean", "jpeg", "char_delete"]
    plain = json.loads((tmp_path / "r.json").read_text())["tiny.pt"]["retrieval"]
    assert data["clean"]["0"]["rsum"] == plain["rsum"]
    assert (tmp_path / "ood" / "ood.png").is_file() and "| jpeg | image |" in capsys.readouterr().out
    per_query = json.loads((tmp_path / "ood" / "uncertainty_per_query.json").read_text())
    n_images = len(json.loads(open(karpathy).read()))
    assert len(per_query["u_i2t"]) == len(per_query["wrong_i2t"]) == n_images
    assert all(0 < u <= 1 for u in per_query["u_i2t"] + per_query["u_t2i"])
    assert sum(per_query["wrong_i2t"]) / n_images == pytest.approx(1 - plain["i2t_R@1"] / 100, abs=1e-6)
    assert ev.main(argv[:6] + ["--ood"]) == 2 and "--ood needs --retrieval-json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(argv + ["--ood-corruptions", "fog"])
