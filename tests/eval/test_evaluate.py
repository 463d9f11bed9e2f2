"""Zero-shot evaluation: metrics on hand-made similarity matrices with known ranks (and against a
brute-force stable sort), evaluators end to end with a tiny random open_clip model (real COCO Karpathy
JSON, ImageFolder, shards), a "perfect model" whose embeddings identify each pair exactly, and the CLI
on what the trainer writes."""
from __future__ import annotations

import io
import json

import open_clip
import pytest
import torch
from PIL import Image

from pipelines.formats.wds import WdsWriter
from pipelines.schema import Sample
from pipelines.text import tokenize
from pipelines.augment.transforms import CLIP_MEAN, CLIP_STD
from train import checkpoint
from train.eval import cli, evaluate as ev
from train.eval.evaluate import (ClassificationEvalConfig, EvalConfigError, RetrievalEvalConfig,
                            classification_metrics, retrieval_metrics, run_evals, to_markdown)
from train.model import build_model, export_open_clip

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
WORDS = ["zero", "one", "two", "three", "four", "five"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """Tiny open_clip configs registered as `lip-eval-tiny` and `lip-eval-tiny16` (embed_dim 16, so
    lip-eval-tiny weights do not fit it) with open_clip.add_model_config."""
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "lip-eval-tiny16.json").write_text(json.dumps({**TINY, "embed_dim": 16}))
    open_clip.add_model_config(folder / "lip-eval-tiny16.json")
    path = folder / "lip-eval-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return str(path)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return open_clip.create_model("lip-eval-tiny", pretrained=None)


def solid(i: int, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, (40 * i, 100, 200 - 30 * i))


def make_perfect(model, monkeypatch, n: int = len(WORDS)):
    """Image i is solid with red = 40·i; a text names WORDS[i] anywhere. Both encode to one-hot(i),
    so every correct pair is an exact match."""
    word_token = {int(t[1]): i for i, t in enumerate(tokenize(WORDS[:n]))}

    def encode_image(images):
        red = images[:, 0].mean((1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]
        return torch.nn.functional.one_hot((red * 255 / 40).round().long(), 32).float()

    def encode_text(tokens):
        ids = [next(word_token[int(t)] for t in row if int(t) in word_token) for row in tokens]
        return torch.nn.functional.one_hot(torch.tensor(ids), 32).float()

    monkeypatch.setattr(model, "encode_image", encode_image)
    monkeypatch.setattr(model, "encode_text", encode_text)
    return model


# ------------------------------------------------------------------ metrics

def test_retrieval_metrics_known_ranks():
    # 3 images, 6 texts: image 0 owns texts 0,1; image 1 owns 2,3; image 2 owns 4,5.
    t2i = [0, 0, 1, 1, 2, 2]
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.0, 0.0, 0.0],  # image 0: its SECOND caption (1) ranks first -> hit @1
        [0.9, 0.0, 0.8, 0.1, 0.0, 0.0],  # image 1: best own text (2) ranks 2nd -> hit @5, not @1
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # image 2: all tied; stable tie-break puts text 4 at rank 4
    ])
    m = retrieval_metrics(sim, t2i)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@5"] == pytest.approx(100) and m["i2t_R@10"] == pytest.approx(100)
    # Text ranks over images (columns, ties -> lower image index first):
    # t0: [0.1,0.9,0] own 0 -> 1; t1: own 0 -> 0; t2: [0.5,0.8,0] own 1 -> 0; t3: own 1 -> 0;
    # t4: [0,0,0] own 2 -> rank 2 (ties lose to images 0 and 1); t5: same -> 2.
    assert m["t2i_R@1"] == pytest.approx(100 * 3 / 6)
    assert m["t2i_R@5"] == pytest.approx(100)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in ev.RETRIEVAL_KEYS[:-1]))


def test_retrieval_ties_are_deterministic_and_rank_k_boundary():
    # All 12 scores tie. Image 0 owns only text 11, which the stable order puts at rank 11: a
    # miss at 10. Image 1 owns texts 0..10 and its first one ranks 0.
    sim = torch.zeros(2, 12)
    t2i = [1] * 11 + [0]
    m = retrieval_metrics(sim, t2i)
    assert m["i2t_R@10"] == pytest.approx(50)  # image 0 misses (rank 11), image 1 hits (rank 0)
    assert m["t2i_R@1"] == pytest.approx(100 / 12)  # only text 11 (owned by image 0) wins its tie
    assert retrieval_metrics(sim, t2i) == m
    # Raising the lone text just above the ties makes it rank 0.
    sim[0, 11] = 1e-6
    assert retrieval_metrics(sim, t2i)["i2t_R@1"] == pytest.approx(100)
    # Own captions tied with another image's caption of lower index: rank 1, a miss at 1.
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.9, 0.0, 0.0, 0.9]])
    assert retrieval_metrics(sim, [1, 0, 0, 1])["i2t_R@1"] == pytest.approx(50)


def test_retrieval_metrics_match_a_stable_sort():
    """Integer scores (many ties), several captions per image: recall from the counting ranks equals
    recall from a brute-force stable descending argsort, image->text taking the best own text."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n_img = int(torch.randint(1, 15, (1,), generator=g))
        extra = torch.randint(0, n_img, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g)
        t2i = torch.cat([torch.arange(n_img), extra])  # every image has a text, some several
        t2i = t2i[torch.randperm(len(t2i), generator=g)]
        sim = torch.randint(0, 4, (n_img, len(t2i)), generator=g).float()
        order_i2t = torch.argsort(sim, dim=1, descending=True, stable=True)
        i2t = torch.tensor([int((t2i[order_i2t[i]] == i).nonzero()[0]) for i in range(n_img)])
        order_t2i = torch.argsort(sim.T, dim=1, descending=True, stable=True)
        t2i_rank = (order_t2i == t2i[:, None]).float().argmax(1)
        m = retrieval_metrics(sim, t2i)
        for k in (1, 5, 10):
            assert m[f"i2t_R@{k}"] == pytest.approx(100 * (i2t < k).float().mean().item())
            assert m[f"t2i_R@{k}"] == pytest.approx(100 * (t2i_rank < k).float().mean().item())


def test_retrieval_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="no text"):
        retrieval_metrics(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError, match="image indices"):
        retrieval_metrics(torch.zeros(2, 2), [0, 5])


def test_classification_metrics_imbalanced():
    # 4 samples of class 0 (all right), 1 of class 1 (wrong): top1 80 %, mean per class 50 %.
    logits = torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, 0.5], [0.9, 0.1], [5.0, 1.0]], dtype=torch.float16)
    m = classification_metrics(logits, [0, 0, 0, 0, 1])
    assert m["top1"] == pytest.approx(80) and m["mean_per_class"] == pytest.approx(50)
    assert "top5" not in m
    # Six classes, a tie between classes 2 and 5 for sample 1 goes to class 2; class 4 absent.
    logits = torch.tensor([[0, 9, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1.0], [6, 5, 4, 3, 2, 1.0]])
    m = classification_metrics(logits, [1, 5, 5])
    assert m["top1"] == pytest.approx(100 / 3)
    assert m["top5"] == pytest.approx(200 / 3)  # sample 2: class 5 ranks 6th
    assert m["mean_per_class"] == pytest.approx(50)  # classes 1 (1/1) and 5 (0/2)
    with pytest.raises(ValueError, match="one label in"):
        classification_metrics(torch.zeros(3, 2), [0, 1])


# ------------------------------------------------------------------ evaluators end to end

def test_retrieval_on_real_coco_karpathy(shared_data, tiny_model):
    root = shared_data / "coco-mini"
    cfg = RetrievalEvalConfig("coco", karpathy_json=str(root / "karpathy/coco_mini_test.json"),
                              images_root=str(root), image_size=64, batch_size=64, workers=0,
                              caption_prefix="a photo of ")
    m = ev.RetrievalEvaluator(cfg).run(tiny_model, "cpu")
    assert set(m) == set(ev.RETRIEVAL_KEYS)
    assert all(0 <= v <= 100 for k, v in m.items() if k != "rsum")
    assert m["rsum"] == pytest.approx(sum(m[k] for k in ev.RETRIEVAL_KEYS[:-1]))
    assert tiny_model.training  # the evaluator restores the model's mode


def test_karpathy_dataset_layout(tmp_path):
    data = {"images": [{"filepath": "val", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]},
                       {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "y"}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    assert ev.load_karpathy(str(tmp_path / "d.json")) == (["val/a.jpg"], [["x"]])


def _perfect_retrieval_json(tmp_path) -> str:
    rows = []
    for i, w in enumerate(WORDS):
        solid(i).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": [f"a {w} here", f"{w}", f"the {w} again"]})
    (tmp_path / "test.json").write_text(json.dumps(rows))
    return str(tmp_path / "test.json")


def test_perfect_model_scores_100(tmp_path, tiny_model, monkeypatch):
    model = make_perfect(tiny_model, monkeypatch)
    cfg = RetrievalEvalConfig("toy", karpathy_json=_perfect_retrieval_json(tmp_path), image_size=32,
                              batch_size=4, workers=0, caption_prefix="a photo of ")
    m = ev.RetrievalEvaluator(cfg).run(model, "cpu")
    assert m["i2t_R@1"] == 100 and m["t2i_R@1"] == 100 and m["rsum"] == pytest.approx(600)
    for i, w in enumerate(WORDS[:4]):  # imbalanced: class i has i + 1 images
        (tmp_path / "cls" / w).mkdir(parents=True)
        for j in range(i + 1):
            solid(i, (30 + j, 30)).save(tmp_path / "cls" / w / f"{j}.png")
    cls = ClassificationEvalConfig("toy-cls", folder=str(tmp_path / "cls"), image_size=32, workers=0,
                                   templates=("a photo of a {}.", "{}"))
    assert ev.ClassificationEvaluator(cls).run(model, "cpu") == {"top1": 100, "mean_per_class": 100}


def test_classification_from_image_folder(tmp_path, tiny_model):
    for c, name in enumerate(["red_car", "blue_sky", "green", "grey", "white", "black"]):
        (tmp_path / name).mkdir()
        for j in range(2):
            solid(c, (50, 60 + j)).save(tmp_path / name / f"{j}.jpg")
    cfg = ClassificationEvalConfig("toy", folder=str(tmp_path), image_size=64, batch_size=5, workers=0)
    ev_ = ev.ClassificationEvaluator(cfg)
    m = ev_.run(tiny_model, "cpu")
    assert set(m) == {"top1", "top5", "mean_per_class"} and all(0 <= v <= 100 for v in m.values())
    w = ev_.classifier(tiny_model, ["car", "sky"], torch.device("cpu"))
    assert w.shape == (2, 32) and torch.allclose(w.norm(dim=-1), torch.ones(2))


def _write_shards(folder, labels) -> None:
    w = WdsWriter(str(folder), 0)
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        solid(i).save(buf, "JPEG", quality=95)
        w.write(Sample(key=f"{i:06d}", image=buf.getvalue(), txt=f"a {WORDS[i]} picture", meta={"label": label}))
    w.close()


def test_shards_retrieval_and_classification(tmp_path, tiny_model, monkeypatch):
    _write_shards(tmp_path / "wds", ["zero", "one", "two", "one", "two", "two"])
    model = make_perfect(tiny_model, monkeypatch)
    common = dict(shards=str(tmp_path / "wds"), image_size=32, batch_size=4, workers=0)
    results = run_evals(model, [RetrievalEvalConfig("shards", **common),
                                ClassificationEvalConfig("labels", classnames=WORDS[:3], **common)])
    assert results["shards"]["i2t_R@1"] == 100 and results["shards"]["t2i_R@1"] == 100
    # Images 3..5 embed as three..five, orthogonal to every class: all logits tie and class 0
    # ("zero") wins, wrong for their labels one, two, two. Per class: 1/1, 1/2, 1/3.
    assert results["labels"] == pytest.approx({"top1": 50, "mean_per_class": 100 * (1 + 1 / 2 + 1 / 3) / 3})
    table = to_markdown({"perfect": results, "other": {"shards": results["shards"]}})
    assert table.splitlines()[0].startswith("| run | shards I2T R@1 | shards R@5 |")
    assert "labels top-1" in table.splitlines()[0]
    assert table.splitlines()[2].startswith("| perfect | 100.0 |") and table.splitlines()[3].endswith("– |")


def test_config_errors_are_one_clear_line(tmp_path):
    with pytest.raises(EvalConfigError, match="exactly one of karpathy_json or shards"):
        RetrievalEvalConfig("x")
    with pytest.raises(EvalConfigError, match="does not exist"):
        RetrievalEvalConfig("x", karpathy_json=str(tmp_path / "nope.json"))
    with pytest.raises(EvalConfigError, match="'{}'"):
        ClassificationEvalConfig("x", folder=str(tmp_path), templates=("a photo",))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EvalConfigError, match="expected a list"):
        ev.load_karpathy(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------ CLI

def test_cli_on_trainer_outputs(tmp_path, capsys):
    """The project's `lip-tiny` (context 32: tokens are cropped) as the trainer writes it: the open_clip
    export, and a full checkpoint (DualPathCLIP `clip.` names, numpy RNG state) that loads the same."""
    torch.manual_seed(0)
    model = build_model("lip-tiny")
    export_open_clip(model, str(tmp_path / "open_clip_model.pt"))
    step = checkpoint.save(str(tmp_path / "ckpt"), 3, {"model": model.state_dict(), "rng": checkpoint.rng_state(),
                                                       "step": 3, "config": {"model": {"name": "lip-tiny"}}})
    json_path = _perfect_retrieval_json(tmp_path)
    for c in ("a", "b"):
        (tmp_path / "cls" / c).mkdir(parents=True)
        solid(len(c)).save(tmp_path / "cls" / c / "0.png")
    out = tmp_path / "res" / "results.json"
    argv = ["--checkpoint", str(tmp_path / "open_clip_model.pt"), "--model", "lip-tiny", "--retrieval-json",
            json_path, "--retrieval-name", "toy", "--classification-folder", str(tmp_path / "cls"),
            "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["open_clip_model.pt"]) == {"toy", "classification"}
    assert (tmp_path / "res" / "results.md").read_text().startswith("| run | toy I2T R@1")
    assert cli.main(argv[:1] + [step] + argv[2:]) == 0
    both = json.loads(out.read_text())  # rows accumulate in one --out file
    assert list(both) == ["open_clip_model.pt", "step_00000003.pt"]
    assert both["step_00000003.pt"] == results["open_clip_model.pt"]
    assert len((tmp_path / "res" / "results.md").read_text().splitlines()) == 4
    assert "| step_00000003.pt |" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "missing.pt"}, "checkpoint missing.pt does not exist"),
    ({"--model": "no-such-model"}, "unknown open_clip model 'no-such-model'"),
    ({"--retrieval-json": None}, "nothing to evaluate"),
    ({"--retrieval-json": "nope.json"}, "karpathy_json nope.json does not exist"),
    ({"--classnames": "nope.txt"}, "No such file or directory: 'nope.txt'"),
    ({"--model-config": "nope.json"}, "model config nope.json does not exist"),
    ({"--model": "lip-eval-tiny16"}, "does not load into lip-eval-tiny16: Error(s) in loading state_dict"),
])
def test_cli_errors_are_one_line(tmp_path, tiny_model, tiny_config, capsys, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")
    args = {"--checkpoint": "tiny.pt", "--model": "lip-eval-tiny", "--model-config": tiny_config,
            "--retrieval-json": _perfect_retrieval_json(tmp_path)}
    args.update(change)
    argv = [x for k, v in args.items() if v is not None for x in (k, v)] + ["--device", "cpu", "--workers", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
