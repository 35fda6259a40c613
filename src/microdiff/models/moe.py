"""Expert-choice mixture-of-experts feed-forward layer (Zhou et al. 2022), as used by MicroDiT.

Each of E experts picks its own top-k tokens per sample by router probability, with
``k = int(capacity * T / E)``; a token may be picked by several experts or by none. An expert is a
GELU MLP; its output is scaled by the router probability of the (token, expert) pair and summed back
into the token. There is no auxiliary load-balancing loss: expert choice is balanced by design.

Two dispatch implementations give the same numbers:
- ``"gather"`` (default): index the chosen tokens, batched matmuls per expert, scatter-add back.
  Cost O(E k D H) = O(capacity T D H), memory O(capacity T D).
- ``"dense"``: micro_diffusion's one-hot einsum, which also costs O(E k T D) = O(capacity T^2 D)
  and allocates a (B, E, k, T) one-hot tensor; kept for the benchmark and as a test reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import round_up

DISPATCH = ("gather", "dense")


def tokens_per_expert(num_tokens: int, num_experts: int, capacity: float) -> int:
    return int(capacity * num_tokens / num_experts)


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE FFN. Parameters: ``gate`` (E, D), ``w1`` (E, D, H), ``w2`` (E, H, D)."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int = 8, capacity: float = 2.0,
                 multiple_of: int = 256, dispatch: str = "gather"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose one of {', '.join(DISPATCH)}")
        if not 0 < capacity <= num_experts:
            raise ValueError(f"expert_capacity must be in (0, num_experts={num_experts}], got {capacity}")
        self.num_experts = num_experts
        self.capacity = capacity
        self.dispatch = dispatch
        self.hidden_dim = round_up(hidden_dim, multiple_of)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, self.hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, self.hidden_dim, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and choices: (B, E, k) probabilities and token indices."""
        k = tokens_per_expert(x.shape[1], self.num_experts, self.capacity)
        probs = F.softmax(self.gate(x), dim=-1)  # (B, T, E)
        return torch.topk(probs.transpose(1, 2), k, dim=-1)

    def experts(self, xin: torch.Tensor) -> torch.Tensor:
        """Apply expert e to its tokens: (B, E, k, D) -> (B, E, k, D)."""
        h = F.gelu(torch.einsum("bekd,edh->bekh", xin, self.w1))
        return torch.einsum("bekh,ehd->bekd", h, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"ExpertChoiceMoE expects tokens of shape (B, T, D), got {tuple(x.shape)}")
        gates, idx = self.route(x)
        if self.dispatch == "dense":
            return self._dense(x, gates, idx)
        return self._gather(x, gates, idx)

    def _gather(self, x, gates, idx):
        b, t, d = x.shape
        flat_idx = (idx + torch.arange(b, device=x.device).view(b, 1, 1) * t).reshape(-1)
        xin = x.reshape(b * t, d).index_select(0, flat_idx).view(*idx.shape, d)
        out = gates.unsqueeze(-1) * self.experts(xin)
        merged = torch.zeros(b * t, d, device=x.device, dtype=out.dtype)
        merged.index_add_(0, flat_idx, out.reshape(-1, d))
        return merged.view(b, t, d)

    def _dense(self, x, gates, idx):
        one_hot = F.one_hot(idx, num_classes=x.shape[1]).to(x.dtype)  # (B, E, k, T)
        xin = torch.einsum("bekt,btd->bekd", one_hot, x)
        out = gates.unsqueeze(-1) * self.experts(xin)
        return torch.einsum("bekt,bekd->btd", one_hot, out)


__all__ = ["ExpertChoiceMoE", "tokens_per_expert", "DISPATCH"]
