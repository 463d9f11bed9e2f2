"""`model.trim_text`: the text tower runs up to the batch's longest text only. With open_clip's causal
mask no position sees a later one, so features and gradients are the full-context call's, to float
rounding, for a fraction of its cost."""
from __future__ import annotations

import torch
from torch import nn

from pipelines.text import tokenize
from train.model import build_model, text_extent, trims_text

CAPTIONS = ["a dog", "two people sit on a bench by the lake", "a red car parked beside a tall brick building"]


def test_extent_is_the_last_non_padding_position():
    tokens = torch.zeros(3, 10, dtype=torch.long)
    tokens[0, :3], tokens[1, :6], tokens[2, :2] = 5, 5, 5
    assert text_extent(tokens) == 6
    assert text_extent(torch.zeros(2, 10, dtype=torch.long)) == 10  # nothing to cut by: keep all


def test_trimmed_text_gives_the_full_context_features_and_gradients():
    tokens = torch.from_numpy(tokenize(CAPTIONS)).long()
    results = {}
    for trim in (True, False):
        torch.manual_seed(0)  # the same weights
        model = build_model("lip-tiny", trim_text=trim)
        assert model.trim_text is trim
        features = model.encode_text(tokens)
        features.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[trim] = features.detach(), grads
    assert text_extent(tokens[:, :32]) < 32  # the test cuts something
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():  # float rounding, relative to each gradient's scale
        assert (results[True][1][name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    position = results[True][1]["clip.positional_embedding"]
    assert position[text_extent(tokens[:, :32]):].abs().max() == 0  # past the longest text: untouched


def test_models_without_a_causal_prefix_run_as_they_are():
    assert trims_text(build_model("lip-tiny").clip)
    assert not trims_text(nn.Linear(2, 2))  # not open_clip's CLIP: its own encode_text
    assert build_model("lip-tiny", trim_text=False).trim_text is False
