"""AdamW with parameter groups and learning-rate schedules (pure functions of the step).

Groups: ``decay`` (matrices and convolution kernels), ``no_decay`` (biases, norm scales,
embeddings, positional tables: any parameter with fewer than 2 dimensions, or under an
``nn.Embedding`` / norm layer, or named ``*pos_embed*``), each split again into ``experts``
(weights of expert-choice MoE layers, found by module type, not by name) and the rest, and the
trainable text encoder's parameters. Empty groups are left out.

micro_diffusion's ``train.py`` meant to halve the experts' learning rate by selecting parameters
whose *name* contains "moe"; MicroDiT's expert weights are named ``...mlp.w1`` / ``...mlp.w2``, so
that group is empty and the halving never happens. Selecting by module type makes
``expert_lr_scale`` do what it says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def _no_decay_names(module: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, _NORMS) or "norm" in type(mod).__name__.lower() or p.ndim < 2 or "pos_embed" in full:
                names.add(full)
    return names


def _expert_names(module: nn.Module) -> set[str]:
    from ..models.moe import ExpertChoiceMoE

    names = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, ExpertChoiceMoE):
            names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters())
    return names


def parameter_groups(backbone: nn.Module, *, lr: float, weight_decay: float, no_decay_on_norms: bool = True,
                     expert_lr_scale: float = 1.0, text_encoder: nn.Module | None = None,
                     text_encoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups (each with a ``name``, ``lr`` and ``weight_decay``)."""
    no_decay = _no_decay_names(backbone) if no_decay_on_norms else set()
    experts = _expert_names(backbone)
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            buckets.setdefault((name in experts, name in no_decay), []).append(p)
    groups = []
    for (is_expert, is_no_decay), params in sorted(buckets.items()):
        groups.append({"name": ("experts" if is_expert else "backbone") + ("/no_decay" if is_no_decay else "/decay"),
                       "params": params, "lr": lr * (expert_lr_scale if is_expert else 1.0),
                       "weight_decay": 0.0 if is_no_decay else weight_decay})
    if text_encoder is not None:
        te_no_decay = _no_decay_names(text_encoder) if no_decay_on_norms else set()
        for is_no_decay in (False, True):
            chosen = [p for n, p in text_encoder.named_parameters() if p.requires_grad and (n in te_no_decay) == is_no_decay]
            if chosen:
                groups.append({"name": "text_encoder" + ("/no_decay" if is_no_decay else "/decay"), "params": chosen,
                               "lr": lr * text_encoder_lr_scale, "weight_decay": 0.0 if is_no_decay else weight_decay})
    return groups


def make_optimizer(groups: list[dict], *, betas: Iterable[float], eps: float, fused: bool | None = None) -> torch.optim.AdamW:
    for g in groups:
        g["initial_lr"] = g["lr"]
    kwargs = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(groups, lr=groups[0]["lr"] if groups else 0.0, betas=tuple(betas), eps=eps, **kwargs)


def lr_factor(step: int, *, total_steps: int, schedule: str = "constant", warmup_steps: int = 0,
              final_lr_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): linear warmup from
    1/warmup to 1 over ``warmup_steps``, then constant, or cosine / linear decay to ``final_lr_ratio``
    at the last step (composer's CosineAnnealingWithWarmup with alpha_f = final_lr_ratio)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - final_lr_ratio) * progress
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant, cosine or linear")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


__all__ = ["parameter_groups", "make_optimizer", "lr_factor", "set_lr"]
