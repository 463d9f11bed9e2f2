"""caption-shards: write synthetic captions for the images of finished shards with a local
Hugging Face image-to-text model (BLIP, GIT, Florence-2, any AutoModelForImageTextToText folder).

    caption-shards --shards shards/coco --model models/blip-base --out captions.jsonl --num-captions 3

Images come through the project's eval loader (`pipelines.loader`, split "eval": shorter side to
the captioner's input size, bicubic, centre crop; DALI on the GPU, torch by default on the CPU).
The loader normalises with the CLIP mean/std; here that is undone to [0, 1] pixels and the
processor's own mean/std applied (a no-op for BLIP and GIT, which use CLIP's). The model runs in
bf16 on the GPU, fp32 on the CPU; nothing is ever downloaded (HF_HUB_OFFLINE).

Output: the JSONL sidecar make-shards and attach-captions join, one line per image,
`{"image": <its identity: meta.image, the path relative to the images root>, "caption": [up to K
captions]}` (`{"key": <the sample key>, ...}` for shards that do not name their images); samples
that share an image (several raw captions per image) are captioned once. Captions are ftfy-cleaned as
raw text is; empty and degenerate ones (under --min-words words, a word or word pair repeated
--max-repeat times) are counted and dropped. Batches never span shards and each shard's
completion record (`OUT.parts/<shard>.json`) holds its lines, so `--resume` redoes only the
unfinished shards and gives the same file as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

from tqdm import tqdm

from pipelines.formats.base import holds_only_partial_writes, remove_partial_writes, write_atomic, write_json_atomic
from pipelines.formats.registry import FORMATS
from pipelines.loader_settings import CHOICES, resolve_backend
from pipelines.text import clean_text
from tools.convert import input_identity
from tools.convert.caption import stored_line_id
from tools.convert.resumable import (PLAN_FILE, UsageError, add_run_options, clear_leftovers, error_exit, resume_plan,
                                     tool_parser, write_plan)
from tools.fault_hooks import point

LINE_IDS = "image identity"  # what a line names an image by (older runs: its source key; not resumable)
FETCH_HINT = ("fetch one once with `huggingface-cli download Salesforce/blip-image-captioning-base "
              "--local-dir DIR` (or any BLIP/GIT/Florence-2 repo), or make a tiny random one with "
              "`caption-shards --init-tiny DIR`")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class CaptionConfig:
    """The arguments that decide the captions: with device and backend, the plan --resume must
    match (batch size and workers change speed only)."""

    shards: str
    model: str
    format: str = "wds"
    num_captions: int = 1
    decoding: str = "beam"  # beam (greedy when K = 1 and --num-beams 1) | nucleus
    num_beams: int = 3
    top_p: float = 0.9
    max_new_tokens: int = 30
    prompt: str | None = None
    min_words: int = 3
    max_repeat: int = 3
    seed: int = 0


def degenerate(text: str, min_words: int = 3, max_repeat: int = 3) -> str | None:
    """Why a cleaned caption is unusable (empty, too_short, repeated) or None. `max_repeat` 0
    turns the repetition check off: a word `max_repeat` times in a row, or a word pair
    `max_repeat` times anywhere ("a man on a man on a man"), is a decoding loop."""
    words = _WORD.findall(text.lower())
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too_short"
    if max_repeat > 1:
        run = 1
        for a, b in zip(words, words[1:]):
            run = run + 1 if a == b else 1
            if run >= max_repeat:
                return "repeated"
        pairs = Counter(zip(words, words[1:]))
        if pairs and pairs.most_common(1)[0][1] >= max_repeat:
            return "repeated"
    return None


def model_fingerprint(folder: str) -> dict[str, int]:
    """File name → size of the model folder: a changed checkpoint makes --resume refuse."""
    return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


class Captioner:
    """A local image-to-text checkpoint: `caption(pixels)` → K decoded strings per image."""

    def __init__(self, folder: str, device: str = "cpu", prompt: str | None = None):
        if not os.path.isdir(folder):
            raise UsageError(f"--model {folder}: no such folder; caption-shards never downloads: {FETCH_HINT}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UsageError(f"--model {folder}: no config.json, not a transformers model folder; {FETCH_HINT}")
        os.environ["HF_HUB_OFFLINE"] = "1"  # a processor or config naming a hub repo must not fetch it
        import torch
        import transformers as tf

        try:
            self.processor = tf.AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = None
            for auto in (tf.AutoModelForImageTextToText, tf.AutoModelForVision2Seq):
                try:
                    model = auto.from_pretrained(folder, local_files_only=True)
                    break
                except ValueError:  # not in this auto class's mapping: try the next
                    continue
            if model is None:
                raise UsageError(f"--model {folder}: {tf.AutoConfig.from_pretrained(folder).model_type} is not an "
                                 "image-to-text model (AutoModelForImageTextToText / AutoModelForVision2Seq)")
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {folder}: does not load ({' '.join(str(e).split())[:200]}); {FETCH_HINT}") from e
        self.torch = torch
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.dtype = torch.bfloat16 if device == "gpu" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        ip = getattr(self.processor, "image_processor", self.processor)
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        if isinstance(size, int):
            size = {"height": size}
        self.size = int(size.get("height") or size.get("shortest_edge") or 224)
        normalize = getattr(ip, "do_normalize", True)
        self.mean = torch.tensor(ip.image_mean if normalize else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std if normalize else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        self.prompt = prompt
        tokenizer = getattr(self.processor, "tokenizer", None)
        self.prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else None

    def pixels(self, loader_images):
        """The loader's CLIP-normalised float [B, 3, S, S] → the model's input (its mean/std)."""
        from pipelines.augment.transforms import CLIP_MEAN, CLIP_STD

        t = self.torch
        x = loader_images.to(self.device, t.float32)  # where the loader left them: GPU with DALI mixed
        clip_mean, clip_std = (t.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        x = x * clip_std + clip_mean
        x = (x.clamp(0, 1) - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    def caption(self, loader_images, num_captions: int, decoding: str, num_beams: int, top_p: float,
                max_new_tokens: int, seed: int | None = None) -> list[list[str]]:
        t = self.torch
        # The folder's generation_config.json decoding defaults (BLIP's generate would not pass
        # them on to its text decoder), under this call's options.
        kwargs = {k: v for k, v in self.model.generation_config.to_diff_dict().items()
                  if k in ("no_repeat_ngram_size", "repetition_penalty", "length_penalty", "min_new_tokens")}
        kwargs.update(max_new_tokens=max_new_tokens, num_return_sequences=num_captions)
        if decoding == "nucleus":
            kwargs.update(do_sample=True, top_p=top_p, num_beams=1, top_k=0)
        else:
            kwargs.update(do_sample=False, num_beams=max(num_beams, num_captions))
        pixels = self.pixels(loader_images)
        if self.prompt_ids is not None:
            kwargs["input_ids"] = self.prompt_ids.to(self.device).repeat(len(pixels), 1)  # BLIP writes into it
        # Sampling is seeded per batch so a resumed shard samples as it did; the caller's RNG stays as it was.
        with t.no_grad(), t.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                t.manual_seed(seed)
            out = self.model.generate(pixel_values=pixels, **kwargs)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        if self.prompt:  # BLIP and decoder-only models echo the prompt: keep the continuation
            p = clean_text(self.prompt).lower()
            texts = [c[len(p):] if clean_text(c).lower().startswith(p) else c for c in map(clean_text, texts)]
        return [texts[i:i + num_captions] for i in range(0, len(texts), num_captions)]


def init_tiny(folder: str, seed: int = 0, image_size: int = 64) -> str:
    """A tiny randomly initialised BLIP captioner (73 k parameters, a 38-word BERT vocabulary)
    with its processor, built offline: to try the caption path without downloading weights.
    Its captions are random words."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, GenerationConfig)

    words = ("a an the of on in with and is are man woman person dog cat bird horse street table "
             "road field red blue green white black two people sitting standing walking grass water "
             "small large near next to").split()
    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    # initializer_range 0.5, not 0.02: with near-zero cross-attention every image gets the same caption.
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 initializer_range=0.5)
    config = BlipConfig(vision_config=dict(small, image_size=image_size, patch_size=16),
                        text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=64,
                                         bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
                                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
                        projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    # Random weights loop on one word; a model folder's generation config is where a checkpoint
    # sets its decoding defaults, so this one forbids repeated word pairs and its captions pass
    # the degenerate-output filter.
    model.generation_config = GenerationConfig(bos_token_id=config.text_config.bos_token_id, eos_token_id=3,
                                               pad_token_id=0, no_repeat_ngram_size=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _parts(out: str) -> str:
    return out + ".parts"


def source_inputs(cfg: CaptionConfig) -> dict[str, str]:
    """What the captions are made from, by content: the shards (their folder's manifest.json, which
    names every file's sha256; a folder without one by its listing) and the model folder."""
    folder = cfg.shards if os.path.exists(os.path.join(cfg.shards, "manifest.json")) else \
        os.path.join(cfg.shards, cfg.format)
    manifest = os.path.join(folder, "manifest.json")
    return {"--shards": manifest if os.path.exists(manifest) else folder, "--model": cfg.model}


def prepare_output(out: str, cfg: CaptionConfig, resume: bool, overwrite: bool, device: str = "cpu",
                   backend: str = "torch") -> str:
    """Check --out's completion records against this plan; return the records' folder. Device
    (bf16 or fp32) and backend (their resampling differs slightly) are part of it: a resumed run
    must caption as the killed one did; so are its inputs' identities (a --resume onto shards
    re-converted since, or another checkpoint of the same size, is refused)."""
    parts = _parts(out)
    plan = {**asdict(cfg), "model_files": model_fingerprint(cfg.model), "device": device, "backend": backend,
            "line_ids": LINE_IDS}
    paths, inputs = source_inputs(cfg), None
    plan_path = os.path.join(parts, PLAN_FILE)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        if os.path.exists(out):
            os.remove(out)
    elif os.path.exists(plan_path):
        inputs = resume_plan(
            "caption-shards", plan_path, plan, paths, resume, where=parts, other="captions made with other arguments",
            fix="pass --overwrite to redo them or choose another --out", this="holds this run's records",
            unchecked="the shards and the model", since="since these captions were begun, so the finished shards' "
            "captions are of the old input; --resume cannot finish them")
    elif os.path.exists(out) or (os.path.exists(parts) and not holds_only_partial_writes(parts)):
        raise UsageError(f"{out} already exists; choose another --out or pass --overwrite")
    clear_leftovers(parts)
    # The sidecar itself is written atomically beside --out: a killed run may have left its temporary file.
    remove_partial_writes(os.path.dirname(os.path.abspath(out)), prefix=os.path.basename(out) + ".tmp")
    write_plan(plan_path, plan, inputs or input_identity.identities(paths))
    return parts


def caption_shard(loader, captioner: Captioner, cfg: CaptionConfig, s: int, bar) -> dict:
    """Caption shard number `s` of the loader's shard set, in batches that start at its first
    sample: the shard's completion record (counts and its sidecar lines)."""
    import torch

    from pipelines.plan.epoch_plan import mix

    shardset = loader.shardset
    start = int(shardset.ends[s - 1]) if s else 0
    end = int(shardset.ends[s])
    state = loader.state_dict()
    loader.load_state_dict({**state, "epoch": 0, "batches_yielded": 0, "offset": start})
    name = os.path.basename(shardset.paths[s])
    counts: Counter = Counter()
    lines: dict[tuple[str, str], list[str]] = {}  # (field, id) of each image's line -> its captions
    pos = start
    for j, batch in enumerate(loader):
        rows = min(len(batch), end - pos)
        expected = list(range(pos, pos + rows))
        ids = batch.ids[:rows].tolist() if batch.ids is not None else expected
        keep = [r for r in range(rows) if ids[r] == expected[r]]  # the others are bad images' substitutes
        counts["bad_images"] += rows - len(keep)
        keys = [stored_line_id(shardset.get(expected[r]).meta, batch.keys[r]) for r in keep]
        todo = []  # one caption job per image: an image's other samples share its line
        for r, k in zip(keep, keys):
            if k not in lines:
                lines[k] = []
                todo.append((r, k))
        counts["samples"] += rows
        if todo:
            images = batch.images[torch.tensor([r for r, _ in todo])]
            seed = mix(cfg.seed, s, j) if cfg.decoding == "nucleus" else None
            outs = captioner.caption(images, cfg.num_captions, cfg.decoding, cfg.num_beams, cfg.top_p,
                                     cfg.max_new_tokens, seed)
            for (_, key), texts in zip(todo, outs):
                kept = []
                for text in map(clean_text, texts):
                    why = degenerate(text, cfg.min_words, cfg.max_repeat) or ("duplicate" if text in kept else None)
                    counts[f"dropped_{why}" if why else "captions"] += 1
                    if not why:
                        kept.append(text)
                lines[key] = kept
                counts["images"] += 1
                counts["images_without_caption"] += not kept
        bar.update(rows)
        pos += rows
        if pos >= end:
            break
    record = {"shard": name, "counts": dict(sorted(counts.items())),
              "lines": [{field: ident, "caption": c} for (field, ident), c in lines.items() if c]}
    return record


def run(cfg: CaptionConfig, out: str, batch_size: int = 16, device: str = "cpu", backend: str | None = None,
        workers: int = 2, resume: bool = False, overwrite: bool = False, on_error: str = "raise",
        progress: bool = True) -> dict:
    """Caption every shard not yet recorded, then write the sidecar; return the counts."""
    from pipelines.loader import LoaderConfig, build_loader

    # auto as every tool resolves it, but torch on a CPU: the default these resumable runs have recorded
    backend = resolve_backend(backend or "auto", device, on_cpu="torch")[0]
    parts = prepare_output(out, cfg, resume, overwrite, device, backend)
    captioner = Captioner(cfg.model, device, cfg.prompt)
    loader = build_loader(LoaderConfig(shards=cfg.shards, format=cfg.format, backend=backend, device=device,
                                       split="eval", batch_size=batch_size, image_size=captioner.size,
                                       workers=workers, on_error=on_error))
    shardset = loader.shardset
    names = [os.path.basename(p) for p in shardset.paths]
    records: dict[str, dict] = {}
    for n in names:
        path = os.path.join(parts, n + ".json")
        if resume and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                records[n] = json.load(f)
    todo = [s for s, n in enumerate(names) if n not in records]
    total = sum(int(shardset.ends[s]) - (int(shardset.ends[s - 1]) if s else 0) for s in todo)
    start = time.perf_counter()
    try:
        with tqdm(total=total, desc=f"caption-shards → {out}", unit=" img", disable=not progress,
                  smoothing=0.1) as bar:
            for s in todo:
                point(f"caption {names[s]}")  # a test hook (tools/fault_hooks.py)
                record = caption_shard(loader, captioner, cfg, s, bar)
                # Unsorted: a line's id stays before its captions, in a resumed run's file too.
                write_json_atomic(os.path.join(parts, names[s] + ".json"), record, indent=None,
                                  sort_keys=False, ensure_ascii=False)
                records[names[s]] = record
    finally:
        loader.close()
    elapsed = time.perf_counter() - start
    counts: Counter = Counter()
    seen, lines = set(), []
    for n in names:  # shard order; an image split across two shards keeps its first shard's line
        counts.update(records[n]["counts"])
        for line in records[n]["lines"]:
            ident = next((f, v) for f, v in line.items() if f != "caption")
            if ident not in seen:
                seen.add(ident)
                lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    write_atomic(out, "".join(lines))
    done = sum(records[names[s]]["counts"].get("samples", 0) for s in todo)
    images = sum(records[names[s]]["counts"].get("images", 0) for s in todo)  # captioned this run
    stats = {"shards": len(names), "shards_reused": len(names) - len(todo), "lines": len(lines),
             **dict(sorted(counts.items())), "seconds": round(elapsed, 3),
             "samples_per_second": round(done / elapsed, 2) if todo and elapsed else None,
             "images_per_second": round(images / elapsed, 2) if todo and elapsed else None}
    write_json_atomic(os.path.join(parts, "stats.json"), stats)
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser("caption-shards", __doc__)
    p.add_argument("--shards", help="a make-shards --out folder or one of its format folders")
    p.add_argument("--format", default=None, choices=tuple(FORMATS), help="default: the first the folder holds")
    p.add_argument("--model", help="local transformers image-to-text folder (never downloaded)")
    p.add_argument("--out", help="the JSONL sidecar to write; its records go to OUT.parts/")
    p.add_argument("--num-captions", type=int, default=1, metavar="K", help="captions per image")
    p.add_argument("--decoding", choices=("beam", "nucleus"), default="beam")
    p.add_argument("--num-beams", type=int, default=3, help="beam width (at least K); 1 with K=1: greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus decoding's probability mass")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--prompt", help="text the captions continue (BLIP: 'a picture of'); stripped from them")
    p.add_argument("--min-words", type=int, default=3, help="drop shorter captions")
    p.add_argument("--max-repeat", type=int, default=3,
                   help="drop captions looping a word or word pair this often; 0: off")
    p.add_argument("--seed", type=int, default=0, help="nucleus decoding's seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=("gpu", "cpu"), default="cpu")
    p.add_argument("--backend", choices=CHOICES["backend"], default="auto",
                   help="image loader; auto: dali on gpu, torch on cpu and where nvidia.dali does not import")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--threads", type=int, help="torch CPU threads of the model (default: torch's, one per core)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="undecodable images: stop or skip")
    add_run_options(p, resume="keep finished shards' captions, do the rest", overwrite="replace --out and its records")
    p.add_argument("--init-tiny", metavar="DIR", help="only write a tiny random BLIP model folder to DIR and exit")
    return p


def detect_format(folder: str) -> str:
    """The format of a format folder (its manifest.json), or the first one an --out folder holds."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            return json.load(f)["format"]
    for fmt in FORMATS:
        if os.path.isdir(os.path.join(folder, fmt)):
            return fmt
    raise UsageError(f"--shards {folder}: no {'/, '.join(FORMATS)}/ folder nor manifest.json; "
                     "pass a make-shards --out folder")


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    for name in ("shards", "model", "out"):
        if not getattr(args, name):
            raise UsageError(f"--{name} is required (see caption-shards --help)")
    if not os.path.isdir(args.shards):
        raise UsageError(f"--shards {args.shards}: no such folder; pass a make-shards --out folder")
    if args.num_captions < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or args.num_beams < 1:
        raise UsageError("--num-captions, --num-beams, --max-new-tokens and --batch-size must be positive")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be within (0, 1]")
    return CaptionConfig(shards=os.path.abspath(args.shards), model=os.path.abspath(args.model),
                         format=args.format or detect_format(args.shards), num_captions=args.num_captions,
                         decoding=args.decoding, num_beams=args.num_beams, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, prompt=args.prompt, min_words=args.min_words,
                         max_repeat=args.max_repeat, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.init_tiny:
            print(f"caption-shards: tiny random BLIP captioner written to {init_tiny(args.init_tiny)}")
            return 0
        cfg = config_from_args(args)
        if not os.path.isdir(cfg.model):  # before anything slow starts
            raise UsageError(f"--model {args.model}: no such folder; caption-shards never downloads: {FETCH_HINT}")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        stats = run(cfg, args.out, args.batch_size, args.device, args.backend, args.workers, args.resume,
                    args.overwrite, args.on_error, progress=not args.quiet)
    except (UsageError, FileNotFoundError, ValueError) as e:
        return error_exit("caption-shards", e)
    dropped = ", ".join(f"{k[8:]} {v}" for k, v in stats.items() if k.startswith("dropped_")) or "none"
    print(f"caption-shards: {stats.get('samples', 0)} samples, {stats.get('images', 0)} images captioned, "
          f"{stats.get('captions', 0)} captions kept, dropped {dropped}; "
          f"{stats.get('images_without_caption', 0)} images without a caption; {stats['lines']} lines; "
          f"{stats['shards_reused']} of {stats['shards']} shards reused; "
          f"{stats['images_per_second']} images/s ({stats['samples_per_second']} samples/s) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
