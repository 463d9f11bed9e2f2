"""Images reach the model as DALI decodes them whichever path reads them (EXIF orientation 1–8,
16-bit greyscale, other modes: checked against DALI's own CPU decoder and the upright photo); the
torch backend leaves the CUDA RNG alone; `lip-train` and `lip-eval` answer bad input with one line
and exit 2."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.formats.wds import WdsWriter
from pipelines.augment.images import decode_rgb
from pipelines.loader import LoaderConfig, build_loader
from pipelines.schema import Sample
from pipelines.backends.torch_loader import torchvision_transform
from pipelines.augment.transforms import CLIP_STD, AugmentSpec
from train.eval import cli
from train import main as train_main

T = Image.Transpose
# The transposition that stores an upright image under each EXIF orientation: the inverse of
# what the tag asks a reader to apply (ImageOps.exif_transpose's table).
STORE = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
         6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}
SIZE = (96, 64)  # not square, multiples of the JPEG block: rotations and flips show


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def oriented_jpeg(upright: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright if STORE[orientation] is None else upright.transpose(STORE[orientation])
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def grey16(seed: int = 0) -> np.ndarray:
    """uint16 [64, 96]: a full-range ramp with noise, so clipping at 255 would whiten nearly all."""
    ramp = np.linspace(0, 65535, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0])
    noise = np.random.default_rng(seed).integers(-300, 300, ramp.shape)
    return np.clip(ramp + noise, 0, 65535).astype(np.uint16)


def dali_decode(blobs: list[bytes]) -> list[np.ndarray]:
    """DALI's CPU decoder (`device_id=None`), as the DALI backend's graph uses it: uint8 [H, W, 3]."""
    dali = pytest.importorskip("nvidia.dali")
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(batch_size=len(blobs), num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: [np.frombuffer(b, np.uint8) for b in blobs], batch=True,
                                  dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    out, = p.run()
    return [np.asarray(out.at(i)) for i in range(len(blobs))]


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.fixture(scope="module")
def upright(shared_data) -> Image.Image:
    """A real, asymmetric photo (no flip or rotation of it looks like itself)."""
    path = sorted((shared_data / "flickr8k-1k" / "images").glob("*.jpg"))[0]
    with Image.open(path) as im:
        return im.convert("RGB").resize(SIZE, Image.BICUBIC)


# ------------------------------------------------------------------ decoding


def test_exif_orientations_decode_upright_as_dali_does(upright):
    blobs = [oriented_jpeg(upright, o) for o in range(1, 9)]
    reference = decode_rgb(blobs[0])  # orientation 1: the upright photo through the same JPEG coding
    for o, blob, dali in zip(range(1, 9), blobs, dali_decode(blobs)):
        ours = decode_rgb(blob)
        assert ours.mode == "RGB" and ours.size == SIZE == dali.shape[1::-1], o
        # JPEG codes the rotated pixels in other blocks: ≈ 1–2 levels; sideways or mirrored: ≈ 50
        assert mean_abs(ours, reference) < 3, o
        assert mean_abs(ours, dali) < 1, o
        if o > 1:  # the test photo is asymmetric enough to tell
            stored = Image.open(io.BytesIO(blob)).convert("RGB").resize(SIZE)
            assert mean_abs(stored, reference) > 20, o


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")])
def test_16bit_greyscale_scales_as_dali_does(fmt, mode):
    values = grey16()
    # (not .convert("I;16B"): PIL's conversion between 16-bit modes clips at 255 too)
    im = Image.frombytes(mode, SIZE, values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    blob = encode(im, fmt)
    assert Image.open(io.BytesIO(blob)).mode == mode
    ours = np.asarray(decode_rgb(blob))
    expected = np.round(values / 257.0).astype(np.uint8)  # 0–65535 → 0–255
    assert ours.shape == (SIZE[1], SIZE[0], 3) and (ours == expected[..., None]).all()
    assert np.abs(ours.astype(int) - dali_decode([blob])[0]).max() == 0


def test_other_modes_decode_as_dali_does(tmp_path):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0]), dtype=np.uint8)))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    blobs = {"L": encode(photo.convert("L"), "PNG"), "RGBA": encode(rgba, "PNG"), "P": encode(palette, "PNG"),
             "LA": encode(photo.convert("LA"), "PNG"), "CMYK": encode(photo.convert("CMYK"), "JPEG", quality=95),
             "1": encode(photo.convert("1"), "PNG")}
    for (mode, blob), dali in zip(blobs.items(), dali_decode(list(blobs.values()))):
        assert Image.open(io.BytesIO(blob)).mode == mode
        assert np.abs(np.asarray(decode_rgb(blob)).astype(int) - dali).max() <= 1, mode
    (tmp_path / "x.png").write_bytes(blobs["L"])  # a path reads the same as its bytes
    assert np.array_equal(np.asarray(decode_rgb(tmp_path / "x.png")), np.asarray(decode_rgb(blobs["L"])))


# ------------------------------------------------------------------ the torch backend


def noise_jpegs(n: int, seed: int) -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": (encode(Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)), "JPEG"), "jpg")
            for i in range(n)}


def write_wds(folder, images: dict[str, tuple[bytes, str]]) -> None:
    w = WdsWriter(str(folder), 0)
    for key, (blob, ext) in images.items():
        w.write(Sample(key=key, image=blob, txt=f"picture {key}", image_ext=ext))
    w.close()


def test_torch_backend_images_are_upright_and_16bit_right(tmp_path, upright):
    """End to end: the eval batch of each image equals the same transform of what it should show."""
    blobs = {f"o{o}": (oriented_jpeg(upright, o), "jpg") for o in range(1, 9)}
    blobs["grey16"] = (encode(Image.fromarray(grey16()), "PNG"), "png")
    write_wds(tmp_path / "wds", blobs)
    expected = {k: decode_rgb(blobs["o1"][0]) for k in blobs}
    expected["grey16"] = Image.fromarray(dali_decode([blobs["grey16"][0]])[0])
    size = 48
    loader = build_loader(LoaderConfig(shards=str(tmp_path / "wds"), backend="torch", split="eval",
                                       batch_size=len(blobs), image_size=size, workers=0))
    batch = next(iter(loader))
    transform = torchvision_transform(AugmentSpec(size, train=False))
    to_pixels = torch.tensor(CLIP_STD)[:, None, None] * 255  # normalized units → 0–255 levels
    for key, image in zip(batch.keys, batch.images):
        delta = (image - transform(expected[key])) * to_pixels
        assert delta.abs().mean() < 3, (key, float(delta.abs().mean()))


def test_torch_backend_leaves_the_cuda_rng_alone(tmp_path, monkeypatch):
    """With workers=0 the crops are seeded in the training process: that must touch neither the
    caller's CPU RNG nor any CUDA generator (torch.manual_seed reseeds them all)."""
    write_wds(tmp_path / "wds", noise_jpegs(6, seed=2))
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("manual_seed_all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("manual_seed", seed)))

    def epoch_images():
        loader = build_loader(LoaderConfig(shards=str(tmp_path / "wds"), backend="torch", batch_size=3,
                                           image_size=32, workers=0, seed=5))
        return [b.images for b in loader]

    torch.manual_seed(123)
    calls.clear()  # only what the loader does counts
    before = torch.get_rng_state()
    first, second = epoch_images(), epoch_images()
    assert calls == []
    assert torch.equal(torch.get_rng_state(), before)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))  # still seeded


# ------------------------------------------------------------------ lip-train / lip-eval input errors


def one_line(capsys, prefix: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def retrieval_json(folder, images: bool = True) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        if images:
            Image.new("RGB", (40, 32), (60 * i, 90, 30)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture {i}"})
    (folder / "test.json").write_text(json.dumps(rows))
    return str(folder / "test.json")


@pytest.mark.parametrize("case, message", [
    ("missing shards", "no such shard folder"),
    ("empty shards", "no wds shards found"),
    ("other format", "holds arrow: set the format to match"),
    ("missing json", "does not exist"),
    ("json is a folder", "is not a file"),
    ("missing images root", "is not a folder"),
    ("wrong images root", "3 of 3 images missing"),
    ("missing weights", "model.pretrained {tmp}/no.pt: no such file"),
])
def test_lip_train_input_errors_are_one_line(tmp_path, capsys, case, message):
    shards, out = tmp_path / "out", tmp_path / "out" / "arrow"
    out.mkdir(parents=True)  # a make-shards --out folder holding arrow shards only
    argv = [f"run.out_dir={tmp_path / 'runs'}", "data.backend=torch", "data.workers=0", "model.name=lip-tiny",
            "data.image_size=32"]
    good_json = retrieval_json(tmp_path / "eval")
    if case == "missing shards":
        argv.append(f"data.train_shards={tmp_path / 'nope'}")
    elif case == "empty shards":
        argv.append(f"data.train_shards={out}")
    else:
        argv.append(f"data.train_shards={shards}")
    argv += {"missing json": [f"eval.retrieval_json={tmp_path / 'nope.json'}"],
             "json is a folder": [f"eval.retrieval_json={tmp_path}"],
             "missing images root": [f"eval.retrieval_json={good_json}", f"eval.images_root={tmp_path / 'no'}"],
             "wrong images root": [f"eval.retrieval_json={good_json}", f"eval.images_root={tmp_path}"],
             "missing weights": [f"model.pretrained={tmp_path / 'no.pt'}"]}.get(case, [])
    assert train_main.main(argv) == 2
    assert message.format(tmp=tmp_path) in one_line(capsys, "lip-train: error:")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from train.model import build_model, export_open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "open_clip_model.pt"
    export_open_clip(build_model("lip-tiny"), str(path))
    return str(path)


def eval_argv(checkpoint: str, *extra: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--model", "lip-tiny", "--device", "cpu", "--workers", "0",
            "--batch-size", "4", *extra]


@pytest.mark.parametrize("case, message", [
    ("missing shards", "shards {tmp}/nope does not exist"),
    ("shards is a file", "is not a folder"),
    ("other format", "holds arrow: set the format to match"),
    ("missing json", "karpathy_json {tmp}/nope.json does not exist"),
    ("json is a folder", "is not a file"),
    ("not json", "not a readable JSON file"),
    ("karpathy without filenames", "lacks filename or sentences"),
    ("missing images root", "images_root {tmp}/no is not a folder"),
    ("wrong images root", "3 of 3 images missing"),
    ("undecodable image", "0.png: image does not decode"),
])
def test_lip_eval_input_errors_are_one_line(tmp_path, capsys, checkpoint, case, message):
    (tmp_path / "out" / "arrow").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    good_json = retrieval_json(tmp_path / "eval")
    extra = {"missing shards": ["--retrieval-shards", str(tmp_path / "nope")],
             "shards is a file": ["--retrieval-shards", str(tmp_path / "file")],
             "other format": ["--retrieval-shards", str(tmp_path / "out")],
             "missing json": ["--retrieval-json", str(tmp_path / "nope.json")],
             "json is a folder": ["--retrieval-json", str(tmp_path)],
             "not json": ["--retrieval-json", str(tmp_path / "bad.json")],
             "karpathy without filenames": ["--retrieval-json", str(tmp_path / "karpathy.json")],
             "missing images root": ["--retrieval-json", good_json, "--images-root", str(tmp_path / "no")],
             "wrong images root": ["--retrieval-json", good_json, "--images-root", str(tmp_path)],
             "undecodable image": ["--retrieval-json", good_json, "--workers", "1"]}[case]
    if case == "undecodable image":  # read in a DataLoader worker, whose re-raise carries a traceback
        (tmp_path / "eval" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert cli.main(eval_argv(checkpoint, *extra)) == 2
    assert message.format(tmp=tmp_path) in one_line(capsys, "lip-eval: error:")


def test_lip_eval_takes_the_make_shards_out_folder(tmp_path, capsys, checkpoint):
    write_wds(tmp_path / "out" / "wds", noise_jpegs(5, seed=3))
    assert cli.main(eval_argv(checkpoint, "--retrieval-shards", str(tmp_path / "out"), "--image-size", "64")) == 0
    assert "| run | retrieval I2T R@1" in capsys.readouterr().out
