"""ALIP's Language and Description Consistency Gates (Yang et al., ICCV 2023; docs/design.md §6).

Per sample i over the global batch, with features L2-normalized:
    S_tc = <t_i, c_i>   raw text vs synthetic caption
    S_xt = <x_i, t_i>   image vs raw text
    S_xc = <x_i, c_i>   image vs synthetic caption
Running means H (start at 1.0, ALIP's choice) are updated *before* use: H ← m·H + (1 − m)·mean(S).
`h_init="first_batch"` instead sets each H to its first batch's mean: a fresh model's similarities
start near 0, so with H at 1.0 the early weights are small until the means have decayed (cold start).
    W_s = min(1, exp(γ_s·(S_tc − H_tc)))                       sample weight (language gate)
    W_t = exp(γ_p·(S_xt − H_xt)), W_c = exp(γ_p·(S_xc − H_xc))  pair weights (description gate),
          applied only where S_tc < H_tc (else 1), not clipped.
No gradient flows through any gate. Samples without a synthetic caption (has_syn False) get
W_s = W_t = 1 and no synthetic-path term; H_tc and H_xc average over the samples that have one
(their S_tc would be <t, t> = 1), H_xt over every sample.
"""
from __future__ import annotations

import torch
from torch import nn


class ConsistencyGates(nn.Module):
    def __init__(self, momentum: float = 0.99, gamma_sample: float = 2.0, gamma_pair: float = 2.0,
                 h_init: str = "one"):
        super().__init__()
        if h_init not in ("one", "first_batch"):
            raise ValueError(f"h_init must be 'one' or 'first_batch', not {h_init!r}")
        self.momentum, self.gamma_sample, self.gamma_pair = momentum, gamma_sample, gamma_pair
        self.h_init = h_init
        for name in ("h_tc", "h_xt", "h_xc"):
            self.register_buffer(name, torch.ones((), dtype=torch.float64))
        if h_init == "first_batch":  # in the state dict, so a resumed run does not re-initialise
            self.register_buffer("h_started", torch.zeros((), dtype=torch.bool))

    def _update(self, h: torch.Tensor, s: torch.Tensor) -> None:
        if self.h_init == "first_batch" and not self.h_started:
            h.copy_(s.double().mean())
        else:
            h.mul_(self.momentum).add_((1 - self.momentum) * s.double().mean())

    @torch.no_grad()
    def forward(self, image: torch.Tensor, raw: torch.Tensor, syn: torch.Tensor,
                has_syn: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Global-batch features [N, D] → per-sample weights [N] (float32; float64 for float64
        features) and the updated means."""
        dtype = torch.promote_types(image.dtype, torch.float32)  # bf16/fp16 → fp32, fp64 kept
        image, raw, syn = image.to(dtype), raw.to(dtype), syn.to(dtype)
        s_tc = (raw * syn).sum(-1)
        s_xt = (image * raw).sum(-1)
        s_xc = (image * syn).sum(-1)
        mask = torch.ones_like(s_tc, dtype=torch.bool) if has_syn is None else has_syn.bool()
        self._update(self.h_xt, s_xt)
        if mask.any():
            self._update(self.h_tc, s_tc[mask])
            self._update(self.h_xc, s_xc[mask])
            if self.h_init == "first_batch":  # H_tc, H_xc wait for a batch with synthetic captions
                self.h_started.fill_(True)
        h_tc, h_xt, h_xc = self.h_tc.to(dtype), self.h_xt.to(dtype), self.h_xc.to(dtype)
        w_sample = torch.exp(self.gamma_sample * (s_tc - h_tc)).clamp(max=1.0)
        inconsistent = s_tc < h_tc
        one = torch.ones_like(s_tc)
        w_raw = torch.where(inconsistent, torch.exp(self.gamma_pair * (s_xt - h_xt)), one)
        w_syn = torch.where(inconsistent, torch.exp(self.gamma_pair * (s_xc - h_xc)), one)
        w_sample = torch.where(mask, w_sample, one)
        w_raw = torch.where(mask, w_raw, one)
        return {"w_sample": w_sample, "w_raw": w_raw, "w_syn": w_syn, "syn_mask": mask,
                "s_tc": s_tc, "s_xt": s_xt, "s_xc": s_xc,
                "h_tc": self.h_tc.clone(), "h_xt": self.h_xt.clone(), "h_xc": self.h_xc.clone()}
