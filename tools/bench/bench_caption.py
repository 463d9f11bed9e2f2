"""bench-caption: captions per second of caption-shards, and what a million images costs.

    bench-caption --model tiny --images 32            # the 73 k-parameter random BLIP
    bench-caption --model blip-base --images 8        # random weights in BLIP-base's shapes (224 M)
    bench-caption --model models/blip-base --shards shards/coco

Runs `caption-shards` itself (eval loader, model, cleaning, filters) on synthetic shards it makes
(or on --shards) and reports images/s, captions/s and hours per million images (the run's
wall-clock rate scaled to 10^6 images; core-hours = that × the cores the run had). The timing
covers the captioning loop, not the model load. Random weights rarely emit EOS, so every
caption runs to --max-new-tokens: an upper bound on decoding steps for a trained model, whose
captions end after 10-15 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tools.captions import caption_shards
from tools.convert import make_shards
from tools.convert.resumable import UsageError
from tools.demo import make_synthetic
from tools.captions.caption_shards import CaptionConfig


def blip_base_random(folder: str, seed: int = 0) -> str:
    """BlipForConditionalGeneration in BLIP-base's shapes (ViT-B/16 at 384 px, BERT-base decoder,
    30,524-token vocabulary of made-up words), randomly initialised, saved with its processor."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
                          + [f"w{i}" for i in range(30524 - 6)]) + "\n")
    tokenizer = BertTokenizer(vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)  # 384 px, CLIP mean/std
    config = BlipConfig(text_config=dict(vocab_size=30524, bos_token_id=5, pad_token_id=0, sep_token_id=3,
                                         eos_token_id=3))
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def synthetic_shards(root: str, n: int, size: int) -> str:
    syn = os.path.join(root, "syn")
    out = os.path.join(root, "shards")
    assert make_synthetic.main(["--out", syn, "--train", str(n), "--test", "0", "--size", str(size),
                                "--workers", "1"]) == 0
    assert make_shards.main(["--source", "table", "--input", os.path.join(syn, "train.jsonl"),
                             "--image-column", "image", "--caption-column", "caption", "--format", "wds",
                             "--samples-per-shard", str(n), "--out", out, "--workers", "1", "--quiet"]) == 0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench-caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | blip-base (random weights) | a local model folder")
    p.add_argument("--shards", help="shards to caption (default: synthetic ones made here)")
    p.add_argument("--images", type=int, default=32, help="synthetic images to make")
    p.add_argument("--image-size", type=int, default=256, help="synthetic images' side")
    p.add_argument("--num-captions", type=int, default=1)
    p.add_argument("--decoding", choices=("beam", "nucleus"), default="beam")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=("gpu", "cpu"), default="cpu")
    p.add_argument("--workers", type=int, default=1, help="loader workers")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-caption-") as tmp:
        shards = args.shards or synthetic_shards(tmp, args.images, args.image_size)
        model = {"tiny": lambda: caption_shards.init_tiny(os.path.join(tmp, "tiny")),
                 "blip-base": lambda: blip_base_random(os.path.join(tmp, "blip-base"))}.get(
            args.model, lambda: args.model)()
        cfg = CaptionConfig(shards=os.path.abspath(shards), model=model, num_captions=args.num_captions,
                            decoding=args.decoding, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                            min_words=0, max_repeat=0)  # count every generated caption
        try:
            stats = caption_shards.run(cfg, os.path.join(tmp, "captions.jsonl"), args.batch_size, args.device,
                                       workers=args.workers, progress=False)
        except UsageError as e:
            print(f"bench-caption: error: {e}", file=sys.stderr)
            return 2
    images_s = stats["images"] / stats["seconds"]
    cores = torch.get_num_threads() if args.device == "cpu" else None
    hours = 1e6 / images_s / 3600
    result = {"model": args.model, "device": args.device, "images": stats["images"], "seconds": stats["seconds"],
              "images_per_second": round(images_s, 3),
              "captions_per_second": round(images_s * args.num_captions, 3),
              "hours_per_million_images": round(hours, 1),
              "core_hours_per_million_images": round(hours * cores, 1) if cores else None,
              "torch_threads": cores, "batch_size": args.batch_size, "num_captions": args.num_captions,
              "decoding": args.decoding, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
