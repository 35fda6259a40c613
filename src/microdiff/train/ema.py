"""Exponential moving averages of the trained weights, one copy per decay, kept in float32.

    ema = EMA(named_parameters, decays=[0.999, 0.9999], warmup=True, start_step=0)
    ema.update(step)                 # after each optimiser step
    ema.state_dict() / ema.load_state_dict(...)
    ema.weights(0.999)               # {name: tensor}, for export

Warmup: the decay used at update t (counted from ``start_step``) is ``min(decay, (1 + t) / (10 + t))``
(the schedule of TensorFlow's ExponentialMovingAverage with num_updates), so a short run's EMA
is not dominated by its random initial weights. Before ``start_step`` the EMA tracks the weights
exactly (micro_diffusion's ``ema_start``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay to use at the ``updates``-th update (0-based)."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class EMA:
    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], decays: Iterable[float],
                 warmup: bool = True, start_step: int = 0, every: int = 1):
        self.params = dict(named_parameters)
        self.decays = [float(d) for d in decays]
        for d in self.decays:
            if not 0.0 <= d < 1.0:
                raise ValueError(f"ema.decays: {d} is not in [0, 1)")
        self.warmup, self.start_step, self.every = bool(warmup), int(start_step), max(int(every), 1)
        self.updates = 0
        self.shadows = {d: {n: p.detach().float().clone() for n, p in self.params.items()} for d in self.decays}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimiser step ``step`` (0-based)."""
        if step < self.start_step:
            for shadow in self.shadows.values():
                for n, p in self.params.items():
                    shadow[n].copy_(p.detach().float())
            return
        if (step - self.start_step) % self.every:
            return
        names = list(self.params)
        src = [self.params[n].detach().float() for n in names]  # once for every decay
        for d, shadow in self.shadows.items():
            beta = ema_decay(d, self.updates, self.warmup)
            torch._foreach_lerp_([shadow[n] for n in names], src, 1.0 - beta)
        self.updates += 1

    def weights(self, decay: float | None = None) -> dict[str, torch.Tensor]:
        decay = self.decays[0] if decay is None else float(decay)
        if decay not in self.shadows:
            raise ValueError(f"ema.export: no EMA with decay {decay}; the run keeps {self.decays}")
        return self.shadows[decay]

    def state_dict(self) -> dict:
        return {"decays": self.decays, "updates": self.updates,
                "shadows": {str(d): dict(s) for d, s in self.shadows.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = [float(d) for d in state["decays"]]
        if saved != self.decays:
            raise ValueError(f"checkpoint EMA decays {saved} differ from the config's {self.decays}")
        self.updates = int(state["updates"])
        for d in self.decays:
            for n, t in state["shadows"][str(d)].items():
                _copy_into(self.shadows[d][n], t)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a full tensor into ``dst``, which may be an FSDP2 DTensor shard."""
    if hasattr(dst, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


__all__ = ["EMA", "ema_decay"]
