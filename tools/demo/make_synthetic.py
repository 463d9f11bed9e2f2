"""A controlled image-text dataset for noise experiments, generated from scratch in seconds.

Procedural images (coloured shapes on textured backgrounds) come with an accurate description,
web-like raw alt-text whose noise kind is known per sample (clean, swap, truncate, offtopic,
hashtag, mojibake) and bland synthetic captions. The noise labels are ground truth: an ALIP-style
gate should down-weight `swap` samples, and its AUC over these labels says how well it does. A
held-out test split with clean captions, none shared by two test images (also in Karpathy layout),
serves retrieval evaluation.

`python -m tools.demo.make_synthetic --out DIR` writes `train.jsonl` / `test.jsonl` (table sources for
the converter: `--image-column image --caption-column caption`), `train_syn.jsonl` (the
synthetic-caption sidecar), `test_karpathy.json`, `synthetic.json` and `images/{train,test}/*.jpg`.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# Bump when the same arguments would produce different files.
SYNTHETIC_VERSION = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 165, 50), "blue": (30, 70, 225), "yellow": (245, 215, 20),
    "purple": (135, 45, 180), "orange": (250, 130, 15), "pink": (245, 120, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128), "beige": (225, 210, 175), "white": (240, 240, 240),
    "black": (25, 25, 25),
}
TEXTURES = {"noise": "noisy", "stripes": "striped", "gradient": "gradient",
            "checkerboard": "checkered"}
KINDS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
         "cross": "crosses"}
NUMBERS = {2: "two", 3: "three"}
# Region anchors (fractions of width, height) and the axis along which a group's members line up.
REGIONS = {"left": (0.17, 0.5, 1, 0.2), "right": (0.83, 0.5, 1, 0.2), "top": (0.5, 0.17, 0, 0.22),
           "bottom": (0.5, 0.83, 0, 0.22), "center": (0.5, 0.5, 0, 0.13)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom", "center": "in the center"}

NOISE_KINDS = ("swap", "truncate", "offtopic", "hashtag", "mojibake")
# Loose alt-text phrasings, deliberately unlike the description templates; {x} is a loose content
# phrase, {n} a camera-like number. The accented ones let mojibake show (and ftfy repair it).
ALT_TEMPLATES = ("my photo of {x}!!", "IMG {n} {x}", "DSC_{n}.JPG {x}", "{x} lol",
                 "{x} wallpaper hd", "check out this {x} pic", "{x} - geometric art",
                 "{x} art print for sale", "new drawing: {x}", "{x} on {t} bg")
ACCENT_TEMPLATES = ("naïve doodle of {x}", "{x} sketched at the café", "crème de la crème: {x}",
                    "{x}, très joli", "{x} — piñata colours", "my résumé header, {x}",
                    "{x} façade pattern")
OFFTOPIC = ("best deals on shoes", "click here", "free shipping on orders over $50",
            "subscribe to our newsletter", "terms and conditions apply", "404 page not found",
            "untitled-1", "image placeholder", "sponsored", "buy now, pay later",
            "limited time offer", "log in to see more", "cheap flights to paris",
            "top 10 dinner recipes", "home | about | contact")
# Caption-like alt-text (`--alt-style plain`): what a careful uploader writes; a swap then differs
# from the image's captions in content only, not in style.
PLAIN_TEMPLATES = ("{x}", "a photo of {x}", "{x} on a {t} background", "picture of {x}", "{x}, drawn")
HASHTAGS = ("#art", "#colors", "#design", "#abstract", "#instaart", "#pattern", "#geometry",
            "#minimal", "#photooftheday", "#artwork", "#graphic", "#nofilter")


@dataclass
class Group:
    """`count` shapes of one kind and colour in one region; centres in pixels."""

    kind: str
    color: str
    size: str
    count: int
    position: str
    radius: float
    centers: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class RenderConfig:
    out: str
    seed: int
    size: int
    quality: int
    side_ratio: float = 1.5
    alt_style: str = "web"


def position_of(x: float, y: float) -> str:
    """Position word of a centre given as fractions of width and height (what captions state)."""
    dx, dy = x - 0.5, y - 0.5
    if abs(dx) < 1 / 6 and abs(dy) < 1 / 6:
        return "center"
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _layout(rng: random.Random, w: int, h: int) -> list[Group]:
    total = rng.choice((1, 1, 2, 2, 3))
    n_groups = rng.randint(1, total)
    cuts = sorted(rng.sample(range(1, total), n_groups - 1))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    regions = rng.sample(sorted(REGIONS), n_groups)
    # Distinct (colour, kind) per group, so a caption's count is never ambiguous.
    pairs = rng.sample([(c, k) for c in COLORS for k in KINDS], n_groups)
    m = min(w, h)
    groups = []
    for count, region, (color, kind) in zip(counts, regions, pairs):
        # Several shapes in one region only fit side by side when small.
        size = rng.choice(("small", "large")) if count == 1 else "small"
        radius = m * (rng.uniform(0.12, 0.15) if size == "large" else rng.uniform(0.06, 0.08))
        ax, ay, axis, spacing = REGIONS[region]
        jit = 0.02 if region == "center" else 0.03
        centers = []
        for k in range(count):
            off = (k - (count - 1) / 2) * spacing
            fx = ax + (off if axis == 0 else 0.0) + rng.uniform(-jit, jit)
            fy = ay + (off if axis == 1 else 0.0) + rng.uniform(-jit, jit)
            centers.append([round(fx * w, 2), round(fy * h, 2)])
        mx = sum(c[0] for c in centers) / count / w
        my = sum(c[1] for c in centers) / count / h
        groups.append(Group(kind, color, size, count, position_of(mx, my), round(radius, 2),
                            centers))
    return groups


def _background(texture: str, base: tuple[int, int, int], w: int, h: int,
                nprng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3] texture in tones between `base` and a shade of it."""
    b = np.array(base, dtype=np.float32)
    shade = b * 0.72 if b.mean() > 100 else b + 55
    # Every texture is an index map into a small palette: whole-image arithmetic on (h, w, 3)
    # arrays was most of the generation time.
    if texture == "noise":
        palette = b + np.arange(-28, 29, dtype=np.float32)[:, None]
        idx = nprng.integers(0, len(palette), size=(h, w))
    elif texture == "gradient":
        palette = shade + (b - shade) * np.linspace(0, 1, 64, dtype=np.float32)[:, None]
        angle = float(nprng.uniform(0, 2 * np.pi))
        t = (np.float32(np.cos(angle) / w) * np.arange(w, dtype=np.float32)[None, :]
             + np.float32(np.sin(angle) / h) * np.arange(h, dtype=np.float32)[:, None])
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        idx = (t * 63).astype(np.intp)
    else:
        palette = np.stack([b, shade])
        if texture == "stripes":
            period = int(nprng.integers(6, 16))
            pattern = (np.arange(w + h) // period) % 2
            direction = int(nprng.integers(0, 3))
            if direction == 2:
                idx = pattern[np.arange(h)[:, None] + np.arange(w)[None, :]]
            else:
                idx = np.broadcast_to(pattern[:h, None] if direction == 0 else pattern[:w], (h, w))
        else:
            cell = int(nprng.integers(8, 24))
            idx = ((np.arange(h) // cell) % 2)[:, None] ^ ((np.arange(w) // cell) % 2)[None, :]
    return np.take(np.clip(palette, 0, 255).astype(np.uint8), idx, axis=0)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)],
                     fill=fill)
    elif kind == "star":
        pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a))
               for k in range(10)
               for rr, a in [(r if k % 2 == 0 else 0.45 * r, -np.pi / 2 + k * np.pi / 5)]]
        draw.polygon(pts, fill=fill)
    else:
        a = 0.33 * r
        draw.polygon([(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
                      (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
                      (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a)],
                     fill=fill)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(g: Group, *, count: str = "exact", size: bool = False, where: bool = False) -> str:
    """count: exact ("two red circles", "a red circle"), loose ("red circles", "a red circle"),
    bare ("red circles", "red circle")."""
    head = " ".join([g.size] * size + [g.color, KINDS[g.kind] if g.count > 1 else g.kind])
    if g.count > 1 and count == "exact":
        head = f"{NUMBERS[g.count]} {head}"
    elif g.count == 1 and count != "bare":
        head = f"{_article(head)} {head}"
    return f"{head} {WHERE[g.position]}" if where else head


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_name(texture: str, color: str) -> str:
    if texture == "gradient":
        return f"{color} gradient background"
    return f"{TEXTURES[texture]} {color} background"


def describe(groups: list[Group], texture: str, bg: str) -> str:
    """The accurate, complete description: every group with count, size, colour, kind, position."""
    return f"{_join([_phrase(g, size=True, where=True) for g in groups])} on a " \
           f"{_background_name(texture, bg)}"


def _paraphrases(groups: list[Group], texture: str, bg: str) -> list[str]:
    """Captioner-like captions: correct content, bland wording."""
    exact = _join([_phrase(g) for g in groups])
    there = "there are" if groups[0].count > 1 else "there is"
    return [
        f"a picture of {exact}.",
        f"an image with {_join([_phrase(g, count='loose') for g in groups])} on a "
        f"{TEXTURES[texture]} background.",
        f"{there} {_join([_phrase(g, where=True) for g in groups])}.",
        f"a {_background_name(texture, bg)} with {_join([_phrase(g, size=True) for g in groups])}.",
        f"a simple drawing of {exact} on a {bg} background.",
        f"{exact} on a {_background_name(texture, bg)}.",
    ]


def _alt_text(rng: random.Random, groups: list[Group], texture: str, accent: bool, style: str = "web",
              unused: Sequence[str] = ()) -> str:
    """Accurate alt-text, never stating anything false. `web`: loosely phrased, may leave groups out;
    `plain`: every group with its count, in caption-like wording; `caption`: one of the `unused`
    paraphrases (the captioner's own style, but not one of this image's synthetic captions)."""
    if style == "caption":
        x = rng.choice(list(unused)).rstrip(".")
        return rng.choice(ACCENT_TEMPLATES).format(x=x) if accent else f"{x}."
    if style == "plain":
        x = _join([_phrase(g, where=rng.random() < 0.5) for g in groups])
        templates = ACCENT_TEMPLATES if accent else PLAIN_TEMPLATES
        return rng.choice(templates).format(x=x, n=rng.randint(1000, 9999), t=TEXTURES[texture])
    mentioned = [g for g in groups if rng.random() < 0.7] or [groups[0]]
    loose = " and ".join(_phrase(g, count="bare", where=rng.random() < 0.2) for g in mentioned)
    n, roll = rng.randint(1000, 9999), rng.random()
    templates = ACCENT_TEMPLATES if accent or roll < 0.1 else ALT_TEMPLATES
    return rng.choice(templates).format(x=loose, n=n, t=TEXTURES[texture])


def make_sample(cfg: RenderConfig, task: tuple[str, int, bool, int]) -> dict[str, Any]:
    """Draw, write and caption one sample; depends only on (cfg, split, index, redraw), not on
    workers. `redraw` > 0 draws another scene for the same index (unique test descriptions)."""
    split, i, accent, redraw = task
    rng = random.Random(f"{cfg.seed}-{split}-{i}" + (f"-redraw{redraw}" if redraw else ""))
    w = rng.randint(cfg.size, int(cfg.side_ratio * cfg.size))
    h = rng.randint(cfg.size, int(cfg.side_ratio * cfg.size))
    groups = _layout(rng, w, h)
    texture, bg = rng.choice(sorted(TEXTURES)), rng.choice(sorted(BACKGROUNDS))
    nprng = np.random.default_rng(rng.getrandbits(63))
    img = Image.fromarray(_background(texture, BACKGROUNDS[bg], w, h, nprng))
    draw = ImageDraw.Draw(img)
    for g in groups:
        for cx, cy in g.centers:
            _draw_shape(draw, g.kind, cx, cy, g.radius, COLORS[g.color])
    rel = f"images/{split}/{i:09d}.jpg"
    img.save(os.path.join(cfg.out, rel), "JPEG", quality=cfg.quality)

    # Text has its own stream and the alt-text comes last, so that the noise plan (accent)
    # changes nothing but the alt-text template.
    trng = random.Random(f"{cfg.seed}-{split}-{i}-text" + (f"-redraw{redraw}" if redraw else ""))
    description = describe(groups, texture, bg)
    paraphrases = _paraphrases(groups, texture, bg)
    rec: dict[str, Any] = {"key": f"syn_{split}_{i:09d}", "image": rel, "description": description,
                           "width": w, "height": h, "background": {"texture": texture, "color": bg},
                           "shapes": [asdict(g) for g in groups]}
    if split == "train":
        rec["syn"] = trng.sample(paraphrases, trng.randint(1, 2))
        rec["alt"] = _alt_text(trng, groups, texture, accent, cfg.alt_style,
                               [c for c in paraphrases if c not in rec["syn"]])
    else:
        rec["captions"] = [description, *trng.sample(paraphrases, trng.randint(1, 4))]
    return rec


def plan_noise(n: int, fractions: dict[str, float], seed: int) -> list[str]:
    """One noise label per train sample: exact counts (largest remainder), seeded shuffle."""
    shares = {**fractions, "clean": max(0.0, 1.0 - sum(fractions.values()))}
    counts = {k: int(v * n) for k, v in shares.items()}
    by_remainder = sorted(shares, key=lambda k: (-(shares[k] * n - counts[k]), k))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    labels = [k for k in (*NOISE_KINDS, "clean") for _ in range(counts[k])]
    random.Random(f"{seed}-train-noise").shuffle(labels)
    return labels


def _swap_partner(rng: random.Random, i: int, recs: list[dict[str, Any]]) -> int:
    """Another image whose (colour, kind) pairs are all different: a true mismatch."""
    own = {(s["color"], s["kind"]) for s in recs[i]["shapes"]}
    j = i
    for _ in range(100):
        j = rng.randrange(len(recs))
        if j != i and own.isdisjoint((s["color"], s["kind"]) for s in recs[j]["shapes"]):
            return j
    return j if j != i else (i + 1) % len(recs)


def apply_noise(rng: random.Random, i: int, kind: str, recs: list[dict[str, Any]]
                ) -> tuple[str, int | None]:
    """Raw text of train sample i under noise `kind`, and the swap partner if any."""
    alt = recs[i]["alt"]
    if kind == "swap":
        j = _swap_partner(rng, i, recs)
        return recs[j]["alt"], j
    if kind == "truncate":
        words = alt.split()
        return " ".join(words[: rng.randint(1, min(3, max(1, len(words) - 1)))]), None
    if kind == "offtopic":
        return " - ".join(rng.sample(OFFTOPIC, rng.randint(1, 2))), None
    if kind == "hashtag":
        return f"{alt} {' '.join(rng.sample(HASHTAGS, rng.randint(2, 4)))}", None
    if kind == "mojibake":
        # Text saved as UTF-8 and read back by a tool that assumed a Windows/Latin-1 page.
        return alt.encode("utf-8").decode(rng.choice(("cp1252", "cp1252", "latin-1"))), None
    return alt, None


def unique_test_captions(test: list[dict[str, Any]], draw) -> None:
    """Give every test image captions no other test image has, in place, so that retrieval
    measures the model and not how ties between identical captions are broken. A test image
    whose full description repeats an earlier one is redrawn (`draw(i, redraw)`) until unique;
    then paraphrases that another test image shares are dropped (the description always stays)."""
    seen: set[str] = set()
    for i, rec in enumerate(test):
        redraw = 0
        while rec["description"] in seen:
            redraw += 1
            rec = test[i] = draw(i, redraw)
        seen.add(rec["description"])
    owners: dict[str, set[int]] = {}
    for i, rec in enumerate(test):
        for caption in rec["captions"]:
            owners.setdefault(caption, set()).add(i)
    for i, rec in enumerate(test):
        rec["captions"] = [c for c in rec["captions"] if owners[c] == {i}]


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def generate(out: str, n_train: int, n_test: int, fractions: dict[str, float], *, seed: int = 0,
             size: int = 160, quality: int = 90, workers: int = 1, side_ratio: float = 1.5,
             alt_style: str = "web") -> dict[str, int]:
    """Write the whole dataset under `out`; returns the count per noise kind."""
    for split in ("train", "test"):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    labels = plan_noise(n_train, fractions, seed)
    tasks = [("train", i, labels[i] == "mojibake", 0) for i in range(n_train)]
    tasks += [("test", i, False, 0) for i in range(n_test)]
    work = partial(make_sample, RenderConfig(out, seed, size, quality, side_ratio, alt_style))
    recs: list[dict[str, Any]] = []
    with tqdm(total=len(tasks), desc="make-synthetic", unit="img", file=sys.stderr) as bar:
        if workers <= 1:
            for task in tasks:
                recs.append(work(task))
                bar.update(1)
        else:
            chunk = max(1, min(64, len(tasks) // (workers * 4)))
            with multiprocessing.Pool(workers) as pool:
                for rec in pool.imap(work, tasks, chunksize=chunk):
                    recs.append(rec)
                    bar.update(1)
    train, test = recs[:n_train], recs[n_train:]
    unique_test_captions(test, lambda i, redraw: work(("test", i, False, redraw)))

    rows = []
    for i, (rec, kind) in enumerate(zip(train, labels)):
        caption, partner = apply_noise(random.Random(f"{seed}-train-{i}-noise"), i, kind, train)
        rows.append({"key": rec["key"], "image": rec["image"], "caption": caption,
                     "description": rec["description"], "noise": kind, "swapped_with": partner,
                     "caption_before_noise": rec["alt"], "width": rec["width"],
                     "height": rec["height"], "background": rec["background"],
                     "shapes": rec["shapes"]})
    _write_jsonl(os.path.join(out, "train.jsonl"), rows)
    _write_jsonl(os.path.join(out, "train_syn.jsonl"),
                 [{"key": r["key"], "caption": r["syn"]} for r in train])
    _write_jsonl(os.path.join(out, "test.jsonl"), [
        {"key": r["key"], "image": r["image"], "caption": r["captions"],
         "description": r["description"], "noise": "clean", "swapped_with": None,
         "width": r["width"], "height": r["height"], "background": r["background"],
         "shapes": r["shapes"]} for r in test])
    with open(os.path.join(out, "test_karpathy.json"), "w", encoding="utf-8") as f:
        json.dump([{"image": r["image"], "caption": r["captions"]} for r in test], f, indent=1)
    return {k: labels.count(k) for k in (*NOISE_KINDS, "clean")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make-synthetic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--train", type=int, default=3000, help="train images")
    p.add_argument("--test", type=int, default=500, help="test images (clean captions)")
    p.add_argument("--size", type=int, default=160, help="min image side")
    p.add_argument("--max-side-ratio", type=float, default=1.5,
                   help="sides vary from --size up to this multiple; 1 makes square images, whose "
                        "centre crop at evaluation keeps shapes at the edges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alt-style", choices=("web", "plain", "caption"), default="web",
                   help="raw alt-text before noise: web (loose, partial, camera names), plain (every group, "
                        "caption-like wording) or caption (another of the image's paraphrases, in the synthetic "
                        "captions' own style: noise then differs from the captions in content only)")
    for kind, default in (("swap", 0.3), ("truncate", 0.1), ("offtopic", 0.1), ("hashtag", 0.2),
                          ("mojibake", 0.1)):
        p.add_argument(f"--{kind}-fraction", type=float, default=default,
                       help=f"fraction of train raw texts with '{kind}' noise")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fractions = {k: getattr(args, f"{k}_fraction") for k in NOISE_KINDS}
    if any(not 0.0 <= v <= 1.0 for v in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        parser.error(f"noise fractions must lie in [0, 1] and sum to at most 1, got {fractions}")
    if args.train < 2 or args.test < 0:
        parser.error("--train must be at least 2 (swaps need a partner) and --test at least 0")
    if args.size < 32 or not 1 <= args.quality <= 100 or args.workers < 1 or args.max_side_ratio < 1:
        parser.error("--size must be >= 32, --quality in [1, 100], --workers >= 1, --max-side-ratio >= 1")

    start = time.perf_counter()
    counts = generate(args.out, args.train, args.test, fractions, seed=args.seed, size=args.size,
                      quality=args.quality, workers=args.workers, side_ratio=args.max_side_ratio,
                      alt_style=args.alt_style)
    # Only what determines the content: the same file for any --out and --workers.
    meta = {"version": SYNTHETIC_VERSION,
            "args": {"train": args.train, "test": args.test, "size": args.size,
                     "max_side_ratio": args.max_side_ratio, "seed": args.seed,
                     "quality": args.quality, "fractions": fractions, "alt_style": args.alt_style},
            "counts": {"train": args.train, "test": args.test}, "noise": counts}
    with open(os.path.join(args.out, "synthetic.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    noise = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"make-synthetic: {args.train} train + {args.test} test images in {args.out} "
          f"({time.perf_counter() - start:.1f}s; noise: {noise})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
