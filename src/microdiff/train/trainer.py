"""The training loop: ``train(config, out, resume)`` runs one stage; see docs/training.md.

Per optimiser step s (0-based), with G the global batch and W processes:

1. the learning rate is set from the schedule (``optim.lr_factor``);
2. per-sample randomness for the whole global batch comes from generators seeded by (seed, s):
   sigma from the configured distribution, caption-dropout flags, the noise; each process slices
   the part of its samples, so W processes draw what one process with batch G draws;
3. each micro-batch's loss (scaled by 1 / accumulation steps) is backpropagated, with DDP's
   gradient sync only on the last one;
4. gradients are clipped to ``optim.grad_clip``, AdamW steps, the EMAs update;
5. the loss is averaged over processes; a non-finite loss stops the run (``TrainingDiverged``)
   before the bad step reaches a checkpoint.

Resume (``--resume auto``) restores weights, EMA, optimiser, step, data position and RNG states,
so a run killed at any point and resumed computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.report import SkipReport
from ..diffusion.denoiser import Denoiser, make_parameterization
from ..diffusion.loss import denoising_loss, make_weighting
from ..diffusion.noise import make_noise_distribution
from ..encoders.pipeline_folder import SamplingDefaults, is_pipeline_folder, read_weights, write_pipeline_folder
from ..utils.errors import UserError, first_line
from ..utils.weights import load_strict
from .checkpoint import latest_checkpoint, load_state, replace_dir, resolve_resume, save_checkpoint
from .config import RunConfig, save_config, to_dict
from .data import build_batches, split_batch, to_device
from .distributed import DistInfo, all_reduce_mean, barrier, gather_objects, setup_distributed, teardown, wrap_model
from .ema import EMA
from .monitor import Monitor
from .run_folder import CONFIG_FILE, HISTORY_FILE, RunLock, check_folder, check_writable, config_changes, \
    read_run_config, record_history, refuse_unsafe
from .optim import lr_factor, make_optimizer, parameter_groups, set_lr


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- building blocks
def build_backbone(config: RunConfig, latent_channels: int, latent_size: int, caption_dim: int) -> nn.Module:
    """The preset ``model.backbone`` with shapes filled in from the data and encoders (unless set)."""
    from ..models import DIT_PRESETS, UNET_PRESETS

    name, options = config.model.backbone, dict(config.model.options)
    # Ambient Diffusion's masked input: [A~ * x_t, A~] in, the image's channels out
    mask_channels = config.ambient.mask_input and config.ambient.mask_channels
    channels = {"in_channels": 2 * latent_channels, "out_channels": latent_channels} if mask_channels \
        else {"in_channels": latent_channels}
    if name in DIT_PRESETS:
        defaults = {"input_size": latent_size, **channels, "caption_channels": caption_dim}
        factory = DIT_PRESETS[name]
    elif name in UNET_PRESETS:
        defaults = {**channels, "caption_channels": caption_dim}
        factory = UNET_PRESETS[name]
    else:
        known = ", ".join([*DIT_PRESETS, *UNET_PRESETS])
        raise ValueError(f"model.backbone={name!r} is not a preset; known: {known}")
    if config.train.gradient_checkpointing:
        defaults["gradient_checkpointing"] = True
    try:
        return factory(**{**defaults, **options})
    except TypeError as err:
        raise ValueError(f"model.options for {name}: {err}") from None


def caption_layout(backbone: nn.Module) -> str:
    return "B1LC" if type(backbone).__name__ == "MicroDiT" else "BLC"


class TrainModule(nn.Module):
    """What a training step calls (and DDP wraps): the backbone, the trainable text encoder if any,
    and the denoising loss around them."""

    def __init__(self, backbone: nn.Module, parameterization, text_encoder: nn.Module | None, layout: str,
                 caption_mask: bool, frozen_text_encoder=None):
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder  # a submodule only when it trains
        self.__dict__["frozen_text_encoder"] = frozen_text_encoder  # not a submodule: no grads, not saved
        self.parameterization = parameterization
        self.layout, self.caption_mask = layout, caption_mask
        self.__dict__["compiled"] = None  # torch.compile'd backbone (shares the parameters)
        self.__dict__["caption_cache"] = {}  # caption -> (states, mask) of its real tokens, frozen encoders only
        self.last_consistency: torch.Tensor | None = None  # the last micro-batch's consistency loss (ambient)

    def _frozen_states(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """A frozen encoder's states for ``captions``, each caption encoded once per run; used only when
        the backbone masks the padding (``caption_mask``), so the padding's length and values do not matter."""
        cache = self.caption_cache
        missing = sorted({c for c in captions if c not in cache})
        if missing:
            with torch.no_grad():
                enc = self.frozen_text_encoder.encode(missing)
            length = enc.mask.sum(1)
            for k, caption in enumerate(missing):
                n = max(int(length[k]), 1)
                cache[caption] = (enc.states[k, :n].float().cpu(), enc.mask[k, :n].cpu())
        longest = max(cache[c][0].shape[0] for c in captions)
        dim = cache[captions[0]][0].shape[1]
        states = torch.zeros(len(captions), longest, dim)
        mask = torch.zeros(len(captions), longest, dtype=torch.bool)
        for i, c in enumerate(captions):
            s, m = cache[c]
            states[i, :s.shape[0]], mask[i, :m.shape[0]] = s, m
        return to_device(states, device), to_device(mask, device)

    def condition(self, text: dict[str, Any], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone caption inputs from precomputed states (``text``/``text_mask``) or raw ``caption``s;
        dropped captions become zero states with no valid token (micro_diffusion's unconditional input)."""
        device = next(self.backbone.parameters()).device
        if "text" in text:
            states, mask = to_device(text["text"], device), to_device(text["text_mask"], device)
        elif self.text_encoder is None and self.caption_mask:
            states, mask = self._frozen_states(list(text["caption"]), device)
        else:  # a trainable encoder, or a frozen one whose padding states the backbone sees (no mask)
            encoder = self.text_encoder if self.text_encoder is not None else self.frozen_text_encoder
            with torch.set_grad_enabled(self.text_encoder is not None and torch.is_grad_enabled()):
                enc = encoder.encode(list(text["caption"]))
            states, mask = enc.states.to(device, torch.float32), enc.mask.to(device)
        keep = (~drop).to(device)
        states = states * keep[:, None, None].to(states.dtype)
        mask = mask & keep[:, None]
        cond = {"y": states[:, None] if self.layout == "B1LC" else states}
        if self.caption_mask:
            cond["y_mask"] = mask
        return cond

    def forward(self, x0, sigma, noise, text, drop, weighting, reduction, mask=None, ambient=None, **backbone_kwargs):
        """``ambient``: denoising_loss's sigma_tn / ambient_weighting / input_mask (see train/ambient.py)."""
        cond = self.condition(text, drop)
        denoiser = Denoiser(self.backbone if self.compiled is None else self.compiled, self.parameterization)
        ambient = dict(ambient or {})
        consistency = ambient.pop("consistency", None)
        result = denoising_loss(denoiser, x0, sigma, noise=noise, weighting=weighting, reduction=reduction,
                                mask=mask, cond={**cond, **backbone_kwargs}, **ambient)
        loss = result.loss
        if consistency is not None:  # inside forward, so a DDP-wrapped module sees every call
            self.last_consistency = consistency_term(denoiser, consistency, cond)
            loss = loss + consistency["weight"] * self.last_consistency
        return loss, result.per_sample


def consistency_term(denoiser, inputs: dict[str, Any], cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ambient Tweedie's consistency loss on the chosen noisy samples, per element (mean over samples
    of the two-draw estimate divided by the elements per sample), so its scale matches the
    denoising loss's mean reduction."""
    from ..ambient.consistency import consistency_loss

    index = inputs["index"]
    sub = {k: v[index] for k, v in cond.items()}
    per_sample = consistency_loss(denoiser, inputs["x_tn"], inputs["sigma_tn"], inputs["sigma"], inputs["steps"],
                                  inputs["generator"], **sub)
    return per_sample.mean() / inputs["x_tn"][0].numel()


def _matches(key: str, patterns: list[str]) -> bool:
    """``key`` (``backbone.x.y``) or its name inside its part (``x.y``) matches one of the fnmatch patterns."""
    name = key.split(".", 1)[-1]
    return any(fnmatch.fnmatch(key, p) or fnmatch.fnmatch(name, p) for p in patterns)


def load_init_weights(module: TrainModule, path: str, use_ema: bool, ignore: list[str]) -> dict[str, Any]:
    """Start from another run's weights (a run folder, checkpoint folder, pipeline folder or a weights
    file, e.g. micro_diffusion's): keys matching ``ignore`` keep their initial values, a MicroDiT's
    positional table is recomputed for this resolution. Every other weight of this model must be
    there in its shape, and every weight there must have a place here (or match ``ignore``), else one
    line says which. A pipeline folder's files are checked against their recorded hashes. Returns a
    short report."""
    from ..models.dit import extract_state_dict, load_checkpoint_file

    source = Path(path)
    state: dict[str, torch.Tensor]
    if is_pipeline_folder(source):
        weights = read_weights(source)  # hashes checked, every file readable
        state = {f"backbone.{k}": v for k, v in weights["backbone"].items()}
        state.update({f"text_encoder.{k}": v for k, v in (weights["text_encoder"] or {}).items()})
    elif source.is_dir() or (source.is_file() and source.name == "state.pt"):
        ckpt = load_state(resolve_resume(source, str(source)) if (source / "checkpoints").is_dir() else source)
        state = dict(ckpt["model"])
        if use_ema and ckpt.get("ema"):
            decay = ckpt["ema"]["decays"][0]
            state.update(ckpt["ema"]["shadows"][str(decay)])
    elif source.is_file():
        state = {f"backbone.{k}": v for k, v in extract_state_dict(load_checkpoint_file(str(source))).items()}
    else:
        raise FileNotFoundError(f"model.init_from={path}: no such run, checkpoint, pipeline folder or weights file")
    own = module.state_dict()
    ignored = [k for k in state if _matches(k, ignore)]
    unplaced = [k for k in state if k not in ignored and k not in own]
    if unplaced:
        raise ValueError(f"model.init_from={path}: {len(unplaced)} weights there have no place in this model "
                         f"(first: {unplaced[0]}); add patterns to model.init_ignore_keys to leave them out")
    state = {k: v for k, v in state.items() if k not in ignored}
    mismatched = [k for k, v in state.items() if v.shape != own[k].shape and not k.endswith("pos_embed")]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"model.init_from={path}: {k} has shape {tuple(state[k].shape)} there and "
                         f"{tuple(own[k].shape)} here; add it to model.init_ignore_keys to keep it freshly initialised")
    missing = [k for k in own if k not in state and not _matches(k, ignore) and not k.endswith("pos_embed")]
    if missing:
        raise ValueError(f"model.init_from={path}: {len(missing)} weights of this model are not there (first: "
                         f"{missing[0]}); add patterns to model.init_ignore_keys to initialise them fresh")
    module.load_state_dict(state, strict=False)
    return {"init_from": str(path), "loaded": len(state), "ignored": ignored}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_generators(seed: int, step: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A CPU generator (sigma, dropout) and one on ``device`` (noise) for optimiser step ``step``."""
    base = (int(seed) * 1_000_003 + int(step)) % (2**63 - 1)
    cpu = torch.Generator().manual_seed(base)
    dev = torch.Generator(device=device).manual_seed(base ^ (0x9E3779B97F4A7C15 % (2**63 - 1)))
    return cpu, dev


class HealthCheck:
    """Non-finite loss or gradient-norm detection without a host-device sync per step: each step's values
    stay on the device until :meth:`first_bad` looks at all of them at once (every ``log.every`` steps
    and before each checkpoint). ``immediate`` (the CPU, where reading costs nothing) checks each step
    before its update is applied."""

    def __init__(self, immediate: bool):
        self.immediate = immediate
        self.pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, torch.stack([loss.detach().float(), grad_norm.detach().float()])))

    def first_bad(self) -> tuple[int, str, float] | None:
        """(step, "loss" or "gradient norm", value) of the first non-finite value since the last call."""
        if not self.pending:
            return None
        steps = [s for s, _ in self.pending]
        values = torch.stack([v for _, v in self.pending]).cpu()
        self.pending = []
        finite = torch.isfinite(values)
        for k in range(len(steps)):
            for j, what in enumerate(("loss", "gradient norm")):
                if not finite[k, j]:
                    return steps[k], what, float(values[k, j])
        return None


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """State of one training stage. ``Trainer(config, out).fit(resume="auto")``."""

    def __init__(self, config: RunConfig, out: str | Path, dist_info: DistInfo | None = None):
        self.config, self.out = config, Path(out)
        self.dist = dist_info or setup_distributed(config.train.device, config.distributed.backend)
        self._owns_dist = dist_info is None
        self.device = self.dist.device
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank (FSDP2 does not broadcast)
        random.seed(config.train.seed)
        self._build()
        torch.manual_seed(config.train.seed + self.dist.rank)  # then each rank its own stream (dropout, workers)
        random.seed(config.train.seed + self.dist.rank)

    # -- setup
    def _build(self) -> None:
        from ..encoders.builtin import BuiltinTextEncoder
        from ..encoders.image import load_autoencoder
        from ..encoders.text import load_text_encoder

        c = self.config
        enc = c.encoders
        self.text_encoder = load_text_encoder(enc.text, device=self.device)
        trains_text = enc.train_text_encoder and isinstance(self.text_encoder, BuiltinTextEncoder)
        if isinstance(self.text_encoder, nn.Module):
            self.text_encoder.requires_grad_(trains_text)
            self.text_encoder.train(trains_text)
        self.autoencoder = load_autoencoder(enc.autoencoder, device=self.device, dtype=enc.autoencoder_dtype)
        if c.data.resolution % self.autoencoder.downsample:
            raise ValueError(f"data.resolution={c.data.resolution} must be a multiple of the autoencoder's "
                             f"downsampling ({self.autoencoder.downsample})")
        latent_size = c.data.resolution // self.autoencoder.downsample
        self.latent_shape = (self.autoencoder.latent_channels, latent_size, latent_size)
        backbone = build_backbone(c, self.autoencoder.latent_channels, latent_size, self.text_encoder.dim)
        self.param = make_parameterization(c.model.parameterization,
                                           **({"sigma_data": c.model.sigma_data} if c.model.parameterization == "edm" else {}))
        self.layout = caption_layout(backbone)
        self.module = TrainModule(backbone, self.param, self.text_encoder if trains_text else None, self.layout,
                                  enc.caption_mask, self.text_encoder).to(self.device)
        self.init_report = None
        if c.model.init_from:
            self.init_report = load_init_weights(self.module, c.model.init_from, c.model.init_ema,
                                                 c.model.init_ignore_keys)
        if c.train.compile:
            if hasattr(backbone, "compile_graph"):  # MicroDiT: one graph, no break (tests/test_dit.py)
                backbone.compile_graph()
            else:
                self.module.__dict__["compiled"] = torch.compile(backbone)
        self.wrapped = wrap_model(self.module, self.dist, c.distributed.strategy)
        self.noise_dist = make_noise_distribution(c.noise.distribution, **c.noise.options)
        if c.ambient.mask_input and not c.ambient.enabled:
            raise ValueError("ambient.mask_input=true needs ambient.enabled=true")
        wkw = {"sigma_data": c.model.sigma_data} if c.loss.weighting == "edm" else {}
        self.weighting = make_weighting(c.loss.weighting, self.param, **wkw)
        self.groups = parameter_groups(backbone, lr=c.optim.lr, weight_decay=c.optim.weight_decay,
                                       no_decay_on_norms=c.optim.no_decay_on_norms,
                                       expert_lr_scale=c.optim.expert_lr_scale,
                                       text_encoder=self.module.text_encoder,
                                       text_encoder_lr_scale=c.optim.text_encoder_lr_scale)
        fused = c.optim.fused if c.optim.fused is not None else not (self.dist.distributed
                                                                      and c.distributed.strategy == "fsdp")
        self.optimizer = make_optimizer(self.groups, betas=c.optim.betas, eps=c.optim.eps, fused=fused)
        self.health = HealthCheck(immediate=self.device.type == "cpu")
        self.ema = EMA(((n, p) for n, p in self.module.named_parameters() if p.requires_grad), c.ema.decays,
                       c.ema.warmup, c.ema.start_step, c.ema.every)
        micro = c.train.micro_batch_size or c.train.batch_size // self.dist.world_size
        self.splits = split_batch(c.train.batch_size, self.dist.world_size, self.dist.rank, micro)
        pin = c.data.pin_memory if c.data.pin_memory is not None else self.device.type == "cuda"
        self.data = build_batches(c.data, c.train.batch_size, self.splits, self.dist.rank, self.dist.world_size,
                                  progress=c.log.progress, pin_memory=pin)
        if hasattr(self.data, "stream") and self.data.stream.info:
            self.data.stream.check_encoders(self.autoencoder.identifier, self.text_encoder.identifier)
        self.ambient, self.ambient_report = (self._build_ambient() if c.ambient.enabled else (None, None))
        self.step = 0
        self.monitor: Monitor | None = None

    def _build_ambient(self):
        """The per-batch ambient step, and (sigma_first) batches chosen for each step's sigmas."""
        from .ambient import (AmbientStep, EligibilityIndex, LevelTable, check_annotation_keys, mixed_seed,
                              sigma_first_batch)
        from .data import MapBatches, SigmaFirstBatches, scan_records

        c = self.config
        table = LevelTable(c.ambient, pixel_space=self.autoencoder.identifier.split(":")[0] == "identity")
        step = AmbientStep(c.ambient, table, self.noise_dist, c.train.seed)
        records, coverage = None, None
        if isinstance(self.data, MapBatches) and (table.annotations or c.ambient.selection == "sigma_first"):
            records = scan_records(self.data.dataset, "ambient noise levels",
                                   progress=self.dist.is_main and c.log.progress)
            coverage = check_annotation_keys(table, [r[0] for r in records if r is not None], c.ambient.annotations,
                                             c.data.source)
        if c.ambient.selection == "sample_first":
            return step, "; ".join(filter(None, ["ambient: sample_first (each sample's sigma drawn inside its range)",
                                                 coverage]))
        if not isinstance(self.data, MapBatches):
            raise ValueError("ambient.selection=sigma_first picks samples by index, which streamed shard folders "
                             "cannot do; use ambient.selection=sample_first")
        bounds = np.array([table.bounds(table.levels(*r)) if r is not None else (np.inf, np.inf) for r in records])
        index = EligibilityIndex(bounds[:, 0], bounds[:, 1])
        global_batch, seed = c.train.batch_size, c.train.seed

        def choose(s: int):
            sigma = self.noise_dist.sample(global_batch, generator=step_generators(seed, s, torch.device("cpu"))[0])
            gen = torch.Generator().manual_seed(mixed_seed("sigma-redraw", seed, s))
            return sigma_first_batch(index, sigma, lambda n, _round: self.noise_dist.sample(n, generator=gen), seed, s)

        self.data = SigmaFirstBatches(self.data.dataset, c.data, global_batch, self.splits, choose,
                                      self.data.pin_memory, eligible=index.eligible, log_skips=self.dist.is_main)
        lo = bounds[np.isfinite(bounds[:, 0]), 0]
        levels = ", ".join(f"{v:g} x{int(n)}" for v, n in zip(*np.unique(lo[lo > 0], return_counts=True)))
        report = (f"ambient: sigma_first over {len(lo)} samples, {int((lo == 0).sum())} clean"
                  + (f"; used only above {levels}" if levels else "") + (f"; {coverage}" if coverage else ""))
        return step, report

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # -- state (FSDP-sharded tensors are gathered to full ones: every rank must call these)
    @property
    def sharded(self) -> bool:
        return self.dist.distributed and self.config.distributed.strategy == "fsdp"

    def full_ema_weights(self) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in self.ema.weights(self.config.ema.export).items()}

    def state_dict(self) -> dict[str, Any]:
        data_states = gather_objects(self.data.state_dict(), self.dist)
        rng_states = gather_objects(_rng_state(), self.dist)
        ema = self.ema.state_dict()
        ema["shadows"] = {d: {k: _full(v) for k, v in shadow.items()} for d, shadow in ema["shadows"].items()}
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model, optimizer = get_state_dict(self.module, self.optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            model, optimizer = self.module.state_dict(), self.optimizer.state_dict()
        monitor = self.monitor.state_dict() if self.monitor is not None and self.dist.is_main else None
        return {"step": self.step, "model": model, "ema": ema, "optimizer": optimizer, "data": data_states,
                "rng": rng_states, "world_size": self.dist.world_size, "monitor": monitor,
                "config": json.loads(json.dumps(to_dict(self.config)))}

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        if state.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"the checkpoint was written by {state.get('world_size')} processes and this run has "
                             f"{self.dist.world_size}: resume with the same number of processes")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            load_strict(self.module, state["model"], source, fix=_UNFIT)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as err:
                raise UserError(f"{source}: its optimizer state does not fit this model ({err}); {_UNFIT}") from None
        try:
            self.ema.load_state_dict(state["ema"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"{source}: its EMA weights do not fit this model ({first_line(err)}); {_UNFIT}") from None
        self.step = int(state["step"])
        self.data.load_state_dict(state["data"][self.dist.rank])
        _set_rng_state(state["rng"][self.dist.rank])

    # -- export
    def ema_parts(self, weights: dict[str, torch.Tensor] | None = None):
        """(text_encoder, autoencoder, denoiser, sampling defaults) of the exported EMA weights (full
        tensors, a fresh copy of the model). Loaded strictly: what the EMA does not track (buffers)
        comes from the trained model, so no weight keeps a fresh initialisation."""
        c = self.config
        weights = self.full_ema_weights() if weights is None else weights
        trained = self.module.backbone
        backbone = _plain_class(trained)(**trained.config).to(self.device).eval()
        backbone.load_state_dict(_export_state(trained, weights, "backbone."), strict=True)
        text_encoder = self.text_encoder
        if self.module.text_encoder is not None:
            te = self.module.text_encoder
            text_encoder = _plain_class(te)(**te.config).to(self.device).eval()
            text_encoder.load_state_dict(_export_state(te, weights, "text_encoder."), strict=True)
        sampling = {k: v for k, v in asdict(c.sampling).items() if k != "steps"}  # same names but steps
        masks = {}
        if c.ambient.mask_input:
            keep = c.ambient.sampling_keep_prob
            masks = {"mask_keep_prob": 1 - c.ambient.delta if keep is None else keep,
                     "mask_draws": c.ambient.sampling_masks, "mask_block": c.ambient.mask_block}
        defaults = SamplingDefaults(**sampling, num_inference_steps=c.sampling.steps, height=c.data.resolution,
                                    width=c.data.resolution, caption_mask=c.encoders.caption_mask,
                                    caption_layout=self.layout, **masks)
        return text_encoder, self.autoencoder, Denoiser(backbone, self.param), defaults

    def ema_pipeline(self, weights: dict[str, torch.Tensor] | None = None):
        """A Pipeline holding the exported EMA weights (for the sample grids during training)."""
        from ..pipeline import Pipeline  # the one upward reference: sample grids need generate()

        return Pipeline(*self.ema_parts(weights))

    def save_pipeline(self, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """The EMA weights as ``out/pipeline`` (the pipeline folder format, written to a temporary
        folder and swapped in, so a kill never leaves a half-written pipeline)."""
        import shutil

        final = self.out / "pipeline"
        tmp = self.out / ".tmp-pipeline"
        shutil.rmtree(tmp, ignore_errors=True)
        text_encoder, autoencoder, denoiser, defaults = self.ema_parts(weights)
        backbone = denoiser.backbone
        write_pipeline_folder(tmp, backbone_class=type(backbone).__name__, backbone_config=backbone.config,
                              backbone_state=backbone.state_dict(), parameterization=denoiser.parameterization.config(),
                              defaults=defaults, text_encoder=text_encoder, autoencoder=autoencoder.identifier)
        replace_dir(tmp, final)
        return final

    def checkpoint(self) -> Path | None:
        self.check_health()  # a diverged step never reaches a checkpoint
        state = self.state_dict()  # every rank takes part (gathers)
        weights = self.full_ema_weights() if self.config.checkpoint.pipeline else None
        path = None
        if self.dist.is_main:
            path = save_checkpoint(self.out, self.step, state, self.config.checkpoint.keep_last)
            if weights is not None:
                self.save_pipeline(weights)
        barrier(self.dist)
        return path

    # -- one step
    def _micro_step(self, offset: int, batch: dict[str, Any], sigma_all, drop_all, noise_all, last: bool,
                    accumulation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        with torch.no_grad():
            if "latent" in batch:
                x0 = to_device(batch["latent"], self.device).float()
            else:
                x0 = self.autoencoder.encode(to_device(batch["image"], self.device)).float()
        if tuple(x0.shape[1:]) != self.latent_shape:
            raise ValueError(f"data.source={c.data.source}: latents of shape {tuple(x0.shape[1:])}, but data.resolution="
                             f"{c.data.resolution} and the autoencoder give {self.latent_shape}; set data.resolution "
                             "to the resolution the latents were made at")
        n = x0.shape[0]
        sigma = sigma_all[offset:offset + n]  # on the host: the ambient step checks ranges there
        drop = drop_all[offset:offset + n]
        noise = noise_all[offset:offset + n]
        mask, ambient = None, None  # without ambient, masked or noisy images are used as they are
        if self.ambient is not None:
            x0, sigma, ambient, mask = self.ambient(batch, x0, sigma, self.step, offset)
        else:
            sigma = to_device(sigma, self.device).to(x0.dtype)
        extra = {}
        if c.loss.mask_ratio > 0:
            extra = {"mask_ratio": c.loss.mask_ratio,
                     "generator": torch.Generator(device=self.device).manual_seed(
                         (c.train.seed * 7919 + self.step * 131 + offset) % (2**63 - 1))}
        sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.train.precision == "bf16")
        with sync:
            with autocast:
                text = {k: batch[k] for k in ("text", "text_mask", "caption") if k in batch}
                loss, per_sample = self.wrapped(x0, sigma, noise, text, drop, self.weighting, c.loss.reduction, mask,
                                                ambient, **extra)
            (loss / accumulation).backward()
        return loss.detach(), per_sample.detach(), sigma.detach()

    def train_step(self, micro_batches: list[tuple[int, dict]]) -> dict[str, Any]:
        c = self.config
        set_lr(self.optimizer, lr_factor(self.step, total_steps=c.train.steps, schedule=c.optim.schedule,
                                         warmup_steps=c.optim.warmup_steps, final_lr_ratio=c.optim.final_lr_ratio))
        cpu_gen, noise_gen = step_generators(c.train.seed, self.step, self.device)
        sigma_all = self.noise_dist.sample(self._global_batch, generator=cpu_gen)
        drop_all = to_device(torch.rand(self._global_batch, generator=cpu_gen) < c.loss.caption_dropout, self.device)
        noise_all = torch.randn((self._global_batch, *self.latent_shape), generator=noise_gen, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        losses, per_samples, sigmas = [], [], []
        for k, (offset, batch) in enumerate(micro_batches):
            if batch is None:
                continue
            loss, per_sample, sigma = self._micro_step(offset, batch, sigma_all, drop_all, noise_all,
                                                       k == len(micro_batches) - 1, len(micro_batches))
            losses.append(loss)
            per_samples.append(per_sample)
            sigmas.append(sigma)
        loss = all_reduce_mean(torch.stack(losses).mean().float(), self.dist)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, c.optim.grad_clip)
                     if c.optim.grad_clip else _grad_norm(self.trainable))
        grad_norm = _full(grad_norm)  # FSDP2 returns the norm as a DTensor
        self.health.add(self.step, loss, grad_norm)
        if self.health.immediate:  # free on the CPU: stop before the bad update is applied
            self.check_health()
        self.optimizer.step()
        self.ema.update(self.step)
        self.step += 1
        # Device tensors, not floats: reading them here would make the host wait for the GPU every step.
        # The monitor converts them when it writes a row (every log.every steps).
        metrics = {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "lr": self.optimizer.param_groups[0]["lr"],
                   "per_sample": torch.cat(per_samples).float(), "sigma": torch.cat(sigmas).float(),
                   "images": sum(int(b["latent" if "latent" in b else "image"].shape[0])
                                 for _, b in micro_batches if b is not None) * self.dist.world_size}
        if self.module.last_consistency is not None:
            metrics["consistency"] = self.module.last_consistency.detach()
            self.module.last_consistency = None
        return metrics

    def check_health(self) -> None:
        """Raise TrainingDiverged for the first step since the last check whose loss or gradient norm was
        not finite (one host-device sync for all of them)."""
        bad = self.health.first_bad()
        if bad is not None:
            step, what, value = bad
            raise TrainingDiverged(self._divergence_message(value, what, step))

    def _divergence_message(self, value: float, what: str, step: int) -> str:
        last = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return (f"step {step}: the {what} is {value}; training stopped before this step reached a checkpoint "
                f"({where}). Lower optim.lr, set optim.grad_clip, or use train.precision=fp32, then "
                "resume with --resume auto")

    # -- the loop
    def fit(self, resume: str | None = "auto", allow_config_change: bool = False) -> dict[str, Any]:
        """Train to ``train.steps``. ``resume``: ``auto`` (continue from the newest intact checkpoint in the
        run folder, if any), ``never`` (the folder must be new or empty) or a checkpoint / run folder.
        ``allow_config_change``: continue although the config changes keys that break an exact resume."""
        c = self.config
        self._global_batch = c.train.batch_size
        lock = self._claim_folder(resume)
        try:
            resumed_from, state = self._resume_state(resume)
            changes = self._check_config(resumed_from, state, allow_config_change)
            if state is not None:
                self.load_state_dict(state, source=str(resumed_from))
            self._record_config(state, changes, allow_config_change)
            self._fit(resumed_from, state)
            barrier(self.dist)  # every rank done (rank 0 writes reports last) before the process group goes
        finally:
            if lock is not None:
                lock.release()
            if self._owns_dist:
                teardown(self.dist)
        return self.summary

    def _agree(self, error: str | None) -> None:
        """Raise the same one-line UserError on every rank when any rank (in practice rank 0) found one."""
        errors = [e for e in gather_objects(error, self.dist) if e]
        if errors:
            raise UserError(errors[0])

    def _claim_folder(self, resume: str | None) -> RunLock | None:
        """Rank 0 locks the run folder and checks that this start overwrites nothing (run_folder.py)."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                check_writable(self.out)
                check_folder(self.out, resume)  # before the lock: a folder that is not ours gets no lock file
                lock = RunLock(self.out).acquire()
                check_folder(self.out, resume)  # and again under it: nothing changed in between
                if lock.took_over:
                    print(f"{self.out}: took over the lock of a run that is no longer running "
                          f"(process {lock.took_over.get('pid')} on {lock.took_over.get('host')})", flush=True)
            except UserError as err:
                if lock is not None:
                    lock.release()
                lock, error = None, str(err)
        self._agree(error)
        return lock

    def _resume_state(self, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from (rank 0 picks the newest intact one) and its state (every rank)."""
        path, error = None, None
        if self.dist.is_main:
            try:
                path = resolve_resume(self.out, resume, note=lambda text: print(text, flush=True))
            except (UserError, FileNotFoundError) as err:
                error = str(err)
        self._agree(error)
        path = gather_objects(None if path is None else str(path), self.dist)[0]
        if path is None:
            return None, None
        return Path(path), load_state(path, verify=False)  # resolve_resume checked its hashes

    def _check_config(self, resumed_from: Path | None, state: dict[str, Any] | None,
                      allowed: bool) -> list[dict[str, Any]]:
        """The changes against the config the checkpoint was trained with (or the run folder's config.yaml
        when no checkpoint was written yet); changes that break an exact resume are refused unless
        ``allowed``. Rank 0 decides; every rank gets the same answer."""
        error, changes = None, []
        if self.dist.is_main:
            current = json.loads(json.dumps(to_dict(self.config)))
            try:
                saved, against = None, None
                if state is not None and state.get("config"):
                    saved, against = state["config"], f"checkpoint {resumed_from}"
                    try:  # the run's own record: say so when it is damaged (it is never rewritten)
                        if (self.out / CONFIG_FILE).is_file() and read_run_config(self.out / CONFIG_FILE) is None:
                            raise UserError(f"{self.out / CONFIG_FILE}: not a config mapping")
                    except UserError as err:
                        print(f"note: {err}; resuming with the config stored in {resumed_from}", flush=True)
                elif (self.out / CONFIG_FILE).is_file():
                    saved, against = read_run_config(self.out / CONFIG_FILE), str(self.out / CONFIG_FILE)
                changes = config_changes(saved, current) if isinstance(saved, dict) else []
                if not allowed:
                    refuse_unsafe(changes, against)
            except UserError as err:
                error = str(err)
        self._agree(error)
        return changes

    def _record_config(self, state: dict[str, Any] | None, changes: list[dict[str, Any]], forced: bool) -> None:
        """Once the checkpoint has loaded: append the changes to config_history.jsonl; write config.yaml only
        for a new run (it stays the config the run was started with)."""
        if not self.dist.is_main:
            return
        if changes:
            record_history(self.out, int(state["step"]) if state else 0, changes, forced=forced)
            print(f"config changes recorded in {self.out / HISTORY_FILE}: "
                  + ", ".join(f"{ch['key']}={ch['new']!r}" for ch in changes[:6]), flush=True)
        if not (self.out / CONFIG_FILE).is_file():
            save_config(self.config, self.out / CONFIG_FILE)

    def _fit(self, resumed_from: Path | None, state: dict[str, Any] | None) -> None:
        c = self.config
        resumed_step = self.step
        monitor = self.monitor = Monitor(self.out, c.log, self.dist.is_main, total_steps=c.train.steps,
                                         start_step=self.step, state=(state or {}).get("monitor"))
        if resumed_from is not None:
            monitor.note(f"resumed from {resumed_from} at step {self.step}")
        if self.ambient_report:
            monitor.note(self.ambient_report)
        if resumed_from is None and self.init_report:
            monitor.note(f"initialised from {self.init_report['init_from']} ({self.init_report['loaded']} tensors, "
                         f"{len(self.init_report['ignored'])} ignored)")
        self.module.train()
        if self.module.text_encoder is None and isinstance(self.text_encoder, nn.Module):
            self.text_encoder.eval()
        start = time.perf_counter()
        try:
            for micro_batches in self.data.steps(self.step, c.train.steps):
                metrics = self.train_step(micro_batches)
                if self.step % max(c.log.every, 1) == 0:
                    self.check_health()  # before the monitor reads the values
                monitor.record(self.step, metrics)
                if c.log.sample_every and self.step % c.log.sample_every == 0 and self.step < c.train.steps:
                    self._sample_grid(monitor)
                if c.checkpoint.every and self.step % c.checkpoint.every == 0 and self.step < c.train.steps:
                    self.checkpoint()
            if resumed_from is None or self.step > resumed_step or not (self.out / "pipeline").is_dir():
                self.checkpoint()
            if c.log.sample_prompts:
                self._sample_grid(monitor)
            skips = SkipReport.merged(gather_objects(self.data.skips(), self.dist))  # a collective: every rank
            if self.dist.is_main:
                monitor.note(f"{skips.summary()} (written to {skips.write(self.out / 'skips')[0]})")
        finally:
            monitor.close()
        self.summary = {"steps": self.step, "seconds": time.perf_counter() - start, "out": str(self.out),
                        "pipeline": str(self.out / "pipeline"), **monitor.summary()}

    def _sample_grid(self, monitor: Monitor) -> None:
        if not self.config.log.sample_prompts:
            return
        self.check_health()
        weights = self.full_ema_weights()  # every rank (FSDP gathers)
        if not self.dist.is_main:
            return
        pipe = self.ema_pipeline(weights)
        with torch.autocast(self.device.type, enabled=False):
            images = pipe.generate(prompt=list(self.config.log.sample_prompts), seed=self.config.log.sample_seed)
        monitor.images(self.step, images, list(self.config.log.sample_prompts))


_UNFIT = ("the config change makes the checkpoint unusable for a resume; pass a new --out, and model.init_from=RUN "
          "to start from its weights")


def _plain_class(module: nn.Module) -> type:
    """The module's own class (FSDP2's fully_shard swaps in a subclass named FSDP<Name>)."""
    return next(c for c in type(module).__mro__ if not c.__name__.startswith("FSDP"))


def _export_state(trained: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The EMA ``weights`` under ``prefix`` (prefix removed) plus what the EMA does not track (buffers) from
    the trained module, so the export loads strictly. Called on rank 0 only: a sharded (FSDP) tensor
    outside the EMA would need every rank, so it is refused instead of hanging."""
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    for key, value in trained.state_dict().items():
        if key not in state:
            if hasattr(value, "full_tensor"):
                raise RuntimeError(f"export: {prefix}{key} is sharded but not in the EMA; it cannot be gathered "
                                   "on one rank")
            state[key] = value.detach()
    return state


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP2 DTensor shard (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)


def train(config: RunConfig, out: str | Path, resume: str | None = "auto",
          allow_config_change: bool = False) -> dict[str, Any]:
    """Run one training stage into ``out``; returns a summary (steps, seconds, final loss, paths)."""
    return Trainer(config, out).fit(resume, allow_config_change)


__all__ = ["Trainer", "TrainModule", "TrainingDiverged", "HealthCheck", "train", "build_backbone", "load_init_weights",
           "step_generators", "caption_layout"]
