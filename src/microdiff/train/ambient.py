"""Ambient training inside the one trainer (``ambient:`` in the config; see docs/ambient.md).

Used only when ``ambient.enabled``; without it every sample is treated as clean.

- :class:`LevelTable`: each sample's trusted noise level sigma_tn ("use only above") and optional
  sigma_max ("use only below"), from the first that says: the annotations file (``microdiff
  annotate``), the record's own meta (``sigma_tn``/``sigma_max``, e.g. a noise corruption's), the
  first matching ``ambient.rules`` entry. Everything else is clean (0, no upper limit).
- Sample selection. ``sigma_first`` (as ambient-utils' sampler): the step's sigmas are drawn first,
  then each slot of the global batch gets a sample eligible at its sigma (sigma_tn + buffer < sigma
  <= sigma_max), uniformly among the eligible ones; a slot where nothing is eligible redraws its
  sigma. Clamping sigma to sigma_tn instead would bunch noisy samples at sigma_tn and waste them.
  ``sample_first``: the usual data order, each sample's sigma drawn from the noise distribution
  restricted to its range (the only choice for streamed shards).
- :class:`AmbientStep`: per micro-batch, the loss inputs: x_tn (the sample's one fixed noise
  realisation added where the data does not already carry its noise), sigma_tn, the observed
  mask A and the network's mask A~ = A * B with B drawn fresh each step.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..ambient.corruptions import further_mask, sample_generator
from .config import AmbientConfig, ConfigError
from .data import to_device

INF = math.inf


@dataclass(frozen=True)
class Levels:
    sigma_tn: float = 0.0  # train only above (0 = clean)
    sigma_max: float | None = None  # train only below (None = no limit)
    present: float = 0.0  # Gaussian noise the data already carries (a pixel-space noise corruption)


def mixed_seed(*parts: Any) -> int:
    """A 63-bit seed from a stable hash of ``parts`` (no two purposes or steps share a stream)."""
    digest = hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63 - 1)


def noise_in_data(meta: dict[str, Any]) -> float:
    """The std of the Gaussian noise a record's pixels already carry (its noise corruption), else 0."""
    if meta.get("corruption") == "noise":
        params = meta.get("corruption_params") or {}
        return float(params.get("sigma", meta.get("sigma_tn", 0.0)))
    return 0.0


def check_rules(rules: list) -> list[dict[str, Any]]:
    """Validate ``ambient.rules``: ``[{match: {field: value | [values]}, sigma_tn: x, sigma_max: y}]``."""
    out = []
    for k, rule in enumerate(rules):
        where = f"ambient.rules[{k}]"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), dict) or not rule["match"]:
            raise ConfigError(f"{where}: write {{match: {{source: diffusiondb}}, sigma_tn: 2.0}} (a non-empty match "
                              f"on meta fields, and the levels); got {rule!r}")
        unknown = set(rule) - {"match", "sigma_tn", "sigma_max"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; a rule has match, sigma_tn, sigma_max")
        sigma_tn, sigma_max = rule.get("sigma_tn", 0.0), rule.get("sigma_max")
        for name, value in (("sigma_tn", sigma_tn), ("sigma_max", sigma_max)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{where}.{name}: expected a number >= 0, got {value!r}")
        if sigma_max is not None and sigma_max <= sigma_tn:
            raise ConfigError(f"{where}: sigma_max={sigma_max} must be above sigma_tn={sigma_tn}")
        out.append({"match": rule["match"], "sigma_tn": float(sigma_tn),
                    "sigma_max": None if sigma_max is None else float(sigma_max)})
    return out


def _value_matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_value_matches(value, w) for w in wanted)
    if isinstance(wanted, str) and any(c in wanted for c in "*?["):
        return isinstance(value, str) and fnmatch.fnmatchcase(value, wanted)
    return value == wanted


def rule_matches(match: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Every field equals the rule's value, matches its glob pattern (``*diffdb*``), or is one of its
    listed values."""
    return all(_value_matches(meta.get(k), v) for k, v in match.items())


class LevelTable:
    """Per-sample noise levels from annotations, the record's meta and the config's rules."""

    def __init__(self, config: AmbientConfig, pixel_space: bool):
        from ..ambient.annotations import read_annotations

        self.annotations = read_annotations(config.annotations) if config.annotations else {}
        self.rules = check_rules(config.rules)
        self.buffer, self.pixel_space = float(config.buffer), pixel_space
        if self.buffer < 0:
            raise ConfigError(f"ambient.buffer={self.buffer}: must be >= 0")

    def levels(self, key: str, meta: dict[str, Any]) -> Levels:
        present = noise_in_data(meta) if self.pixel_space else 0.0
        if key in self.annotations:
            sigma_tn, sigma_max = self.annotations[key]["sigma_tn"], self.annotations[key]["sigma_max"]
        elif "sigma_tn" in meta or "sigma_max" in meta:
            sigma_tn, sigma_max = float(meta.get("sigma_tn", 0.0)), meta.get("sigma_max")
        else:
            rule = next((r for r in self.rules if rule_matches(r["match"], meta)), None)
            sigma_tn, sigma_max = (rule["sigma_tn"], rule["sigma_max"]) if rule else (0.0, None)
        # a sample cannot be trusted below the noise it already carries
        return Levels(max(float(sigma_tn), present), None if sigma_max is None else float(sigma_max), present)

    def bounds(self, levels: Levels) -> tuple[float, float]:
        """(lo, hi]: the noise levels this sample trains at."""
        lo = levels.sigma_tn + self.buffer if levels.sigma_tn > 0 else 0.0
        return lo, INF if levels.sigma_max is None else levels.sigma_max


def check_annotation_keys(table: LevelTable, keys: list[str], path: str | None, source: str) -> str | None:
    """Refuse annotations that name none of the dataset's samples (an annotations file of another
    dataset would silently train everything as clean); returns a note when only some are covered."""
    if not table.annotations:
        return None
    matched = sum(1 for k in keys if k in table.annotations)
    if matched == 0:
        first = next(iter(table.annotations))
        raise ConfigError(f"ambient.annotations={path}: none of its {len(table.annotations)} keys is a sample of "
                          f"data.source={source} (its first key is {first!r}, the data's "
                          f"{keys[0] if keys else 'none'!r}); annotate this dataset with microdiff annotate, or "
                          "fix the keys")
    if matched < len(keys):
        return (f"ambient: {matched} of {len(keys)} samples are in {path}; the other {len(keys) - matched} use "
                "their own meta and ambient.rules")
    return None


# ----------------------------------------------------------------------------- selection
class EligibilityIndex:
    """Samples grouped by their (lo, hi] range; picks, for each sigma, a sample eligible there."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        pairs = np.stack([lo, hi], 1)
        self.ranges, inverse = np.unique(pairs, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.members = [np.flatnonzero(inverse == g) for g in range(len(self.ranges))]
        self.sizes = np.array([len(m) for m in self.members], dtype=np.float64)

    def choose(self, sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One sample index per sigma (uniform among the eligible), -1 where none is eligible."""
        out = np.full(len(sigma), -1, dtype=np.int64)
        lo, hi = self.ranges[:, 0], self.ranges[:, 1]
        for j, s in enumerate(sigma):
            weights = np.where((lo < s) & (s <= hi), self.sizes, 0.0)
            total = weights.sum()
            u = rng.random(2)
            if total == 0:
                continue
            g = min(int(np.searchsorted(np.cumsum(weights), u[0] * total, side="right")), len(weights) - 1)
            members = self.members[g]
            out[j] = members[min(int(u[1] * len(members)), len(members) - 1)]
        return out

    def eligible(self, sigma: float) -> np.ndarray:
        """Every sample index eligible at ``sigma`` (a fixed order: replacements are drawn from it)."""
        lo, hi = self.ranges[:, 0], self.ranges[:, 1]
        groups = np.flatnonzero((lo < sigma) & (sigma <= hi))
        return np.concatenate([self.members[g] for g in groups]) if len(groups) else np.zeros(0, dtype=np.int64)

    def fraction_eligible(self, sigma: float) -> float:
        lo, hi = self.ranges[:, 0], self.ranges[:, 1]
        return float(self.sizes[(lo < sigma) & (sigma <= hi)].sum() / self.sizes.sum())


def sigma_first_batch(index: EligibilityIndex, sigma: torch.Tensor, redraw: Callable[[int, int], torch.Tensor],
                      seed: int, step: int, max_rounds: int = 100) -> tuple[list[int], torch.Tensor]:
    """The global batch of ``step``: sample indices for the step's sigmas (slots with nothing eligible
    redraw their sigma with ``redraw(n, round)``). Deterministic in (seed, step)."""
    rng = np.random.default_rng([int(seed), int(step), 0xA3B1])
    sigma = sigma.clone()
    chosen = index.choose(sigma.double().numpy(), rng)
    for r in range(max_rounds):
        empty = np.flatnonzero(chosen < 0)
        if not len(empty):
            return chosen.tolist(), sigma
        sigma[empty] = redraw(len(empty), r).to(sigma.dtype)
        chosen[empty] = index.choose(sigma[empty].double().numpy(), rng)
    raise ValueError(f"step {step}: after {max_rounds} redraws some noise levels still have no eligible sample; the "
                     "noise distribution puts almost no mass where the data may be used (check ambient levels)")


def truncated_sigma(noise_dist, lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator,
                    max_rounds: int = 200) -> torch.Tensor:
    """Per sample, sigma from ``noise_dist`` restricted to (lo, hi] (rejection; exact for any distribution)."""
    sigma = torch.full_like(lo, float("nan"))
    todo = torch.ones_like(lo, dtype=torch.bool)
    for _ in range(max_rounds):
        n = int(todo.sum())
        if n == 0:
            return sigma
        candidate = noise_dist.sample(n, generator=generator).to(lo.dtype)
        ok = (candidate > lo[todo]) & (candidate <= hi[todo])
        idx = todo.nonzero().reshape(-1)[ok]
        sigma[idx] = candidate[ok]
        todo[idx] = False
    k = int(todo.nonzero()[0])
    raise ValueError(f"no sigma in ({float(lo[k]):.3g}, {float(hi[k]):.3g}] after {max_rounds} draws from "
                     f"noise.distribution; widen the distribution or lower the sample's sigma_tn")


def check_consistency(config: AmbientConfig) -> None:
    """The consistency phase needs noisy samples with the Tweedie target (x_tn) and unmasked inputs."""
    if config.consistency_weight < 0:
        raise ConfigError(f"ambient.consistency_weight={config.consistency_weight}: must be >= 0 (0 turns it off)")
    if config.consistency_weight == 0:
        return
    if config.consistency_steps < 1 or config.consistency_samples < 1:
        raise ConfigError(f"ambient.consistency_steps={config.consistency_steps}, ambient.consistency_samples="
                          f"{config.consistency_samples}: both must be integers >= 1")
    if config.target != "tweedie":
        raise ConfigError("ambient.consistency_weight > 0 needs ambient.target=tweedie: the consistency phase starts "
                          "its reverse draws from each sample's noisy x_tn")
    if config.mask_input:
        raise ConfigError("ambient.consistency_weight > 0 cannot be combined with ambient.mask_input: the consistency "
                          "phase is for noisy data (sigma_tn), not masked pixels; use ambient.sampling_masks for "
                          "consistency across masks")


# ----------------------------------------------------------------------------- per micro-batch
def check_above(sigma, sigma_tn: list[float]) -> None:
    """Every noisy sample's sigma must lie above its sigma_tn (checked on the host, before the loss)."""
    for k, (s, tn) in enumerate(zip(sigma, sigma_tn)):
        if tn > 0 and s <= tn:
            raise ValueError(f"sample {k}: sigma={float(s):.4g} is not above its trusted noise level "
                             f"sigma_tn={tn:.4g}; draw sigma above sigma_tn for noisy data")


class AmbientStep:
    """Turns a micro-batch into the ambient loss's inputs."""

    def __init__(self, config: AmbientConfig, table: LevelTable, noise_dist, seed: int):
        if config.mask_input and not 0 < config.delta < 1:
            raise ConfigError(
                f"ambient.delta={config.delta}: with masked inputs delta must be in (0, 1). At delta = 0 the "
                "network sees every pixel its loss is scored on (A~ = A), so nothing it cannot see is ever "
                "supervised and it never learns to fill in missing pixels; Ambient Diffusion uses 0.1")
        if config.mask_block < 1:
            raise ConfigError(f"ambient.mask_block={config.mask_block}: must be an integer >= 1")
        check_consistency(config)
        self.config, self.table, self.noise_dist, self.seed = config, table, noise_dist, int(seed)

    def __call__(self, batch: dict[str, Any], x0: torch.Tensor, sigma: torch.Tensor, step: int,
                 offset: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor | None]:
        """Returns (x0 or x_tn, sigma, loss keyword arguments, loss mask A). ``sigma``: the micro-batch's
        sigmas on the host (drawn there), so that range checks never wait for the GPU."""
        c, device = self.config, x0.device
        levels = [self.table.levels(k, m) for k, m in zip(batch["key"], batch["meta"])]
        if "sigma" in batch:  # sigma_first: drawn with the batch
            sigma = batch["sigma"]
        else:
            bounds = torch.tensor([self.table.bounds(lv) for lv in levels], dtype=torch.float64)
            outside = ((sigma.double() <= bounds[:, 0]) | (sigma.double() > bounds[:, 1])).numpy()  # host data
            if outside.any():
                outside = torch.from_numpy(outside)
                gen = torch.Generator().manual_seed(mixed_seed("sigma-in-range", self.seed, step, offset))
                redrawn = truncated_sigma(self.noise_dist, bounds[outside, 0], bounds[outside, 1], gen)
                sigma = sigma.clone()
                sigma[outside] = redrawn.to(sigma.dtype)
        kwargs: dict[str, Any] = {}
        if c.target == "tweedie":
            tn = [lv.sigma_tn for lv in levels]
            check_above(sigma.numpy(), tn)
            sigma_tn = to_device(torch.tensor(tn, dtype=x0.dtype), device)
            x0 = self._add_fixed_noise(x0, levels, batch["key"])
            kwargs = {"sigma_tn": sigma_tn, "ambient_weighting": c.weighting, "check_sigma": False}
        sigma = to_device(sigma, device).to(x0.dtype)
        if c.consistency_weight > 0:
            kwargs["consistency"] = self._consistency_inputs(x0, sigma_tn, tn, step, offset)
        loss_mask = None
        if c.mask_input:
            observed = batch.get("mask")
            observed = (torch.ones_like(x0[:, :1]) if observed is None else observed.to(device, x0.dtype))
            if observed.shape[-2:] != x0.shape[-2:]:
                raise ValueError(f"pixel masks of size {tuple(observed.shape[-2:])} but the model trains on "
                                 f"{tuple(x0.shape[-2:])} latents; masked (Ambient Diffusion) training needs "
                                 "pixel-space data (encoders.autoencoder=identity)")
            gen = torch.Generator().manual_seed(mixed_seed("further-mask", self.seed, step, offset))
            kwargs["input_mask"] = further_mask(observed.cpu(), c.delta, gen, c.mask_block).to(device)
            loss_mask = observed
        elif "mask" in batch:
            raise ValueError("the data has pixel masks but ambient.mask_input is false: set ambient.mask_input=true "
                             "(Ambient Diffusion) or ambient.enabled=false (treat the masked images as clean)")
        return x0, sigma, kwargs, loss_mask

    def _consistency_inputs(self, x_tn: torch.Tensor, sigma_tn: torch.Tensor, tn: list[float], step: int,
                            offset: int) -> dict[str, Any] | None:
        """Up to ``consistency_samples`` noisy samples of the micro-batch, each with a sigma below its
        sigma_tn drawn from the noise distribution restricted to (0, sigma_tn], and the generator of
        their reverse draws (all seeded by step and offset, so a resumed run repeats them).
        ``tn``: the same sigma_tn values on the host."""
        c = self.config
        chosen = [i for i, v in enumerate(tn) if v > 0][:c.consistency_samples]
        if not chosen:
            return None
        index = torch.tensor(chosen, device=x_tn.device)
        gen = torch.Generator().manual_seed(mixed_seed("consistency-sigma", self.seed, step, offset))
        hi = torch.tensor([tn[i] for i in chosen], dtype=torch.float64)
        sigma = truncated_sigma(self.noise_dist, torch.zeros_like(hi), hi, gen).to(x_tn.device, x_tn.dtype)
        draws = torch.Generator(device=x_tn.device).manual_seed(mixed_seed("consistency-draws", self.seed, step, offset))
        return {"index": index, "x_tn": x_tn[index], "sigma_tn": sigma_tn[index], "sigma": sigma,
                "steps": c.consistency_steps, "weight": c.consistency_weight, "generator": draws}

    def _add_fixed_noise(self, x0: torch.Tensor, levels: list[Levels], keys: list[str]) -> torch.Tensor:
        """x_tn = x + sqrt(sigma_tn^2 - present^2) z_key: each sample's one noise realisation."""
        extra = [math.sqrt(max(lv.sigma_tn**2 - lv.present**2, 0.0)) for lv in levels]
        if not any(extra):
            return x0
        x0 = x0.clone()
        for i, (amount, key) in enumerate(zip(extra, keys)):
            if amount > 0:
                z = torch.randn(x0.shape[1:], generator=sample_generator(str(key), self.seed))
                x0[i] += amount * z.to(x0.device, x0.dtype)
        return x0


__all__ = ["Levels", "LevelTable", "EligibilityIndex", "AmbientStep", "check_rules", "rule_matches",
           "sigma_first_batch", "truncated_sigma", "mixed_seed", "noise_in_data", "check_consistency"]
