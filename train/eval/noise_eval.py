"""How well the gates find noisy raw texts, where noise labels are known (the synthetic dataset
records `meta.noise` per sample), as the AUC of ranking swapped raw texts below clean ones:
- post hoc (`noise_auc`): by the final model's S_tc = <raw, synthetic> (language gate) and
  S_xt = <image, raw> (description gate), one pass over the data in eval mode; the gate weights
  are monotone in these, so it is the AUC the gates would have with the final model;
- training time (`training_auc`): by the weights the gates actually gave each sample when it was
  last trained on in the final epoch (`sample_weights.pt`, train/sample_weights.py; every sample,
  or the fixed subset of `run.sample_record_max` ids a large set records): W_s and W_s·W_t. W_s is clipped at 1, so every sample the gate passes ties with the others; ties count
  half. The margin S_tc − H_tc the gate saw (same record) ranks those too: its AUC is what the
  gate's ranking gives as trained, the gap to W_s's is what the clip's ties cost."""
from __future__ import annotations

import numpy as np
import torch

from pipelines.loader import LoaderConfig, build_loader
from pipelines.shardset import ShardSet
from train.sample_weights import final_epoch, record_ids


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


def noise_labels(shardset: ShardSet, ids=None) -> list[str | None]:
    """meta.noise per sample id (of `ids`, default every id)."""
    return [shardset.get(int(gid)).meta.get("noise") for gid in (range(len(shardset)) if ids is None else ids)]


def _split(values, labels, positive: str, negative: str, where: str):
    pos = np.array([v for v, n in zip(values, labels) if n == positive])
    neg = np.array([v for v, n in zip(values, labels) if n == negative])
    if not len(pos) or not len(neg):
        raise ValueError(f"{where}: needs samples with meta.noise == {positive!r} and {negative!r}")
    return pos, neg


def noise_auc(model, shards: str, fmt: str, image_size: int, positive: str = "swap",
              negative: str = "clean", **kwargs) -> dict[str, float]:
    scores, shardset = consistency_scores(model, shards, fmt, image_size, **kwargs)
    keys = [shardset.key(gid) for gid in range(len(shardset))]
    pos, neg = _split([scores[k] for k in keys], noise_labels(shardset), positive, negative, shards)
    # Noisy pairs should score *lower*: rank by the negated similarity.
    return {"auc_language_gate": auc(-pos[:, 0], -neg[:, 0]),
            "auc_description_gate": auc(-pos[:, 1], -neg[:, 1]),
            "n_swap": len(pos), "n_clean": len(neg)}


def training_auc(weights_file: str, shards: str, fmt: str, positive: str = "swap",
                 negative: str = "clean") -> dict[str, float]:
    """AUC of the gates' training-time weights (lower for `positive`) over the samples recorded in
    the final epoch; `weights_file` is a run's sample_weights.pt, `shards` the folder it trained on."""
    state = torch.load(weights_file, map_location="cpu")
    shardset = ShardSet(shards, fmt)
    samples = int(state.get("samples", len(state["step"])))
    if len(shardset) != samples:
        raise ValueError(f"{weights_file}: {samples} samples, but {shards} holds {len(shardset)}")
    keep = final_epoch(state).numpy()
    ids = record_ids(state)
    labels = [None] * len(ids)  # only the final epoch's samples are read
    for row, label in zip(np.flatnonzero(keep), noise_labels(shardset, ids[keep])):
        labels[row] = label
    names = ["w_sample", "w_pair"] + (["gate_margin"] if "gate_margin" in state else [])  # older runs lack it
    values = np.stack([state[n].numpy() for n in names], axis=1)
    pos, neg = _split(values, labels, positive, negative, weights_file)
    out = {"auc_train_w_sample": auc(-pos[:, 0], -neg[:, 0]),
           "auc_train_w_sample_raw": auc(-pos[:, 1], -neg[:, 1]),
           "n_train_final_epoch": int(keep.sum())}
    if "gate_margin" in names:
        out["auc_train_gate_margin"] = auc(-pos[:, 2], -neg[:, 2])
        # the clip's ties: samples the gate passed (W_s = 1), per kind
        out["passed_swap"] = float((pos[:, 0] >= 1).mean())
        out["passed_clean"] = float((neg[:, 0] >= 1).mean())
    return out
