"""How well a model's consistency signals find noisy raw texts, where noise labels are known
(the synthetic dataset records `meta.noise` per sample): the AUC of ranking swapped raw texts
below clean ones by the language gate's S_tc = <raw, synthetic> and by the description gate's
S_xt = <image, raw>. The gate weights are monotone in these, so the AUC is the gates' AUC."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.loader import LoaderConfig, build_loader


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0
    ranks[order] = np.repeat(avg, counts) + 1
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def consistency_scores(model, shards: str, fmt: str, image_size: int, batch_size: int = 128,
                       workers: int = 2, device: str = "cpu"):
    """({key: (S_tc, S_xt)} for every sample of a shard folder in eval mode, the ShardSet)."""
    loader = build_loader(LoaderConfig(shards=shards, format=fmt, backend="torch", split="eval",
                                       batch_size=batch_size, image_size=image_size, workers=workers))
    model.eval()
    out = {}
    for batch in loader:
        image, raw, syn, _ = model(batch.images.to(device), batch.raw_tokens.to(device),
                                   batch.syn_tokens.to(device))
        s_tc = (raw * syn).sum(-1).cpu().numpy()
        s_xt = (image * raw).sum(-1).cpu().numpy()
        out.update({k: (float(a), float(b)) for k, a, b in zip(batch.keys, s_tc, s_xt)})
    return out, loader.shardset


def noise_auc(model, shards: str, fmt: str, image_size: int, positive: str = "swap",
              negative: str = "clean", **kwargs) -> dict[str, float]:
    scores, shardset = consistency_scores(model, shards, fmt, image_size, **kwargs)
    labels = {}
    for gid in range(len(shardset)):
        s = shardset.get(gid)
        labels[s.key] = s.meta.get("noise")
    pos = np.array([scores[k] for k, n in labels.items() if n == positive])
    neg = np.array([scores[k] for k, n in labels.items() if n == negative])
    if not len(pos) or not len(neg):
        raise ValueError(f"{shards}: needs samples with meta.noise == {positive!r} and {negative!r}")
    # Noisy pairs should score *lower*: rank by the negated similarity.
    return {"auc_language_gate": auc(-pos[:, 0], -neg[:, 0]),
            "auc_description_gate": auc(-pos[:, 1], -neg[:, 1]),
            "n_swap": len(pos), "n_clean": len(neg)}
