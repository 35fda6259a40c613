"""Training configuration as data: dataclasses with visible defaults, read from YAML, overridden
with dotted ``key=value`` pairs, validated with one clear line per mistake, saved into the run.

    config = load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.steps=2000"])
    save_config(config, "runs/demo/config.yaml")

A YAML file may start from another with ``extends: other.yaml`` (a path relative to the file);
mappings merge key by key, anything else is replaced. Override values are parsed as YAML scalars
or flow collections (``optim.betas=[0.9,0.95]``, ``model.init_from=null``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from ..data.sources import DataSpec, check_spec
from ..diffusion.noise import NOISE_DISTRIBUTIONS, make_noise_distribution
from ..diffusion.samplers import SAMPLERS
from ..models import DIT_PRESETS, UNET_PRESETS
from ..utils.devices import parse_device
from ..utils.errors import UserError
from ..utils.registry import check_options, lookup


class ConfigError(UserError):
    """A configuration mistake; the message is one line naming the key and the fix.

    A section checks its own ranges in ``__post_init__`` by raising ``ConfigError("key: what is wrong
    and the fix")``; :func:`build` prefixes the file and the section (``demo.yaml: train.batch_size: ...``).
    """


# ----------------------------------------------------------------------------- range checks
def _require(ok: bool, message: str) -> None:
    """A section's range check: ``message`` is "key: what is wrong; the fix" (build() adds file and section)."""
    if not ok:
        raise ConfigError(message)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _options_of(what: str, make: Callable[..., Any], name: str, options: dict) -> None:
    """``make(name, **options)`` builds; a misspelt or out-of-range option becomes a one-line ConfigError."""
    try:
        make(name, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}: {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    backbone: str = "MicroDiT_Nano_2"  # a preset of microdiff.models (MicroDiT_*, UNet_*)
    options: dict = field(default_factory=dict)  # keyword overrides for the preset
    parameterization: str = "edm"  # edm | v | eps | x0
    sigma_data: float = 0.5  # EDM only
    init_from: Union[str, None] = None  # weights to start from: run folder, checkpoint file or pipeline folder
    init_ignore_keys: list = field(default_factory=list)  # fnmatch patterns of keys to leave as initialised
    init_ema: bool = True  # take init_from's EMA weights when it has them


    def __post_init__(self):
        _require(self.sigma_data > 0 and _finite(self.sigma_data), f"sigma_data: must be a positive number, got {self.sigma_data}")
        _require(self.backbone in _presets(), f"backbone: {lookup_message(self.backbone, _presets(), 'preset')}")

@dataclass
class DataConfig(DataSpec):
    """The ``data:`` section: ``data.sources.DataSpec`` (its fields are the keys), range-checked on build."""

    def __post_init__(self) -> None:
        try:
            check_spec(self)
        except UserError as err:  # build() prefixes the file and the section
            raise ConfigError(str(err)) from None


@dataclass
class EncoderConfig:
    text: str = "builtin:byte-d64-l2-h4-len64"  # microdiff.encoders.load_text_encoder identifier
    train_text_encoder: bool = True  # the built-in encoder trains with the model; others stay frozen
    autoencoder: str = "identity"  # microdiff.encoders.load_autoencoder identifier
    autoencoder_dtype: str = "float32"
    caption_mask: bool = True  # pass the caption padding mask to the backbone


@dataclass
class NoiseConfig:
    distribution: str = "lognormal"  # lognormal | cosine | discrete | loguniform
    options: dict = field(default_factory=lambda: {"p_mean": -1.2, "p_std": 1.2})


    def __post_init__(self):
        if self.distribution not in NOISE_DISTRIBUTIONS:
            return  # build() names the choices
        cls = NOISE_DISTRIBUTIONS[self.distribution]
        try:
            check_options(cls, self.options, "options")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _options_of(f"options (for {self.distribution})", make_noise_distribution, self.distribution, self.options)

@dataclass
class LossConfig:
    weighting: str = "natural"  # natural | edm | eps | v | min_snr | x0
    reduction: str = "mean"  # mean | mean_per_sample | sum_per_sample
    mask_ratio: float = 0.0  # MicroDiT patch masking during training
    caption_dropout: float = 0.1  # fraction of captions replaced by the unconditional one (for CFG)


    def __post_init__(self):
        _require(0 <= self.mask_ratio < 1, f"mask_ratio: must be in [0, 1), got {self.mask_ratio}")
        _require(0 <= self.caption_dropout <= 1, f"caption_dropout: must be in [0, 1], got {self.caption_dropout}")

@dataclass
class AmbientConfig:  # learning from corrupted data; see docs/ambient.md
    enabled: bool = False  # off: every sample is treated as clean (noise levels and masks ignored)
    annotations: Union[str, None] = None  # CSV key,sigma_tn,sigma_max (microdiff annotate)
    rules: list = field(default_factory=list)  # [{match: {source: diffusiondb}, sigma_tn: 2.0, sigma_max: null}]
    buffer: float = 0.0  # a sample with sigma_tn > 0 trains only at sigma > sigma_tn + buffer
    target: str = "tweedie"  # tweedie: E[x_tn|x_t] towards x_tn | plain: the usual loss, only above sigma_tn
    weighting: str = "tweedie"  # tweedie | ambient_o (times loss.weighting)
    selection: str = "sigma_first"  # sigma_first: draw sigma, then an eligible sample | sample_first
    mask_input: bool = False  # Ambient Diffusion: the network sees [A~ * x_t, A~] (2C channels in)
    mask_channels: bool = True  # false: no mask channels (fine-tune a pretrained C-channel model on A~ * x_t)
    delta: float = 0.1  # further corruption: A~ = A * B, B keeps each element with probability 1 - delta
    mask_block: int = 1  # B drops block x block squares (a MicroDiT's patch size: the patch-level variant)
    sampling_keep_prob: Union[float, None] = None  # sampling mask survival (default (1 - delta) * mean observed)
    sampling_masks: int = 1  # > 1: average D over this many fixed masks (consistency across masks)
    consistency_weight: float = 0.0  # > 0: add Ambient Tweedie's consistency loss below sigma_tn (noisy data)
    consistency_steps: int = 4  # ancestral reverse steps from sigma_tn down to the consistency sigma
    consistency_samples: int = 4  # noisy samples per micro-batch that get the consistency loss


    def __post_init__(self):
        _require(self.buffer >= 0 and _finite(self.buffer), f"buffer: must be >= 0, got {self.buffer}")
        _require(0 <= self.delta < 1, f"delta: must be in [0, 1), got {self.delta}")
        _require(self.mask_block >= 1, f"mask_block: must be at least 1, got {self.mask_block}")
        _require(self.sampling_keep_prob is None or 0 < self.sampling_keep_prob <= 1,
                 f"sampling_keep_prob: must be in (0, 1] or null, got {self.sampling_keep_prob}")
        _require(self.sampling_masks >= 1, f"sampling_masks: must be at least 1, got {self.sampling_masks}")
        # the consistency options are checked with the rest of the recipe (train/ambient.py check_consistency)

@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay_on_norms: bool = True  # no weight decay on biases, norms, embeddings and positional tables
    expert_lr_scale: float = 1.0  # learning-rate factor for MoE expert weights
    text_encoder_lr_scale: float = 1.0
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1  # cosine/linear: the lr at the last step, as a fraction of lr
    grad_clip: Union[float, None] = 1.0  # max global grad norm (null: no clipping)
    fused: Union[bool, None] = None  # fused AdamW kernel (null: on, except under FSDP)


    def __post_init__(self):
        _require(self.lr > 0 and _finite(self.lr), f"lr: must be a positive number, got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
                 f"betas: must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {self.betas}")
        self.betas = [float(b) for b in self.betas]
        _require(self.eps > 0, f"eps: must be > 0, got {self.eps}")
        _require(self.expert_lr_scale >= 0, f"expert_lr_scale: must be >= 0, got {self.expert_lr_scale}")
        _require(self.text_encoder_lr_scale >= 0, f"text_encoder_lr_scale: must be >= 0, got {self.text_encoder_lr_scale}")
        _require(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.final_lr_ratio <= 1, f"final_lr_ratio: must be in [0, 1], got {self.final_lr_ratio}")
        _require(self.grad_clip is None or (self.grad_clip > 0 and _finite(self.grad_clip)),
                 f"grad_clip: must be a positive number or null (no clipping), got {self.grad_clip}")

@dataclass
class EMAConfig:
    decays: list = field(default_factory=lambda: [0.999])  # one EMA copy per decay
    warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)), t counted from start_step
    start_step: int = 0
    every: int = 1
    export: Union[float, None] = None  # the decay whose weights become the pipeline (default: the first)


    def __post_init__(self):
        _require(len(self.decays) > 0, "decays: list at least one EMA decay, e.g. [0.999]")
        _require(all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1 for d in self.decays),
                 f"decays: each decay must be a number in [0, 1), got {self.decays}")
        _require(len(set(self.decays)) == len(self.decays), f"decays: {self.decays} lists a decay twice")
        _require(self.start_step >= 0, f"start_step: must be >= 0, got {self.start_step}")
        _require(self.every >= 1, f"every: must be at least 1, got {self.every}")
        _require(self.export is None or self.export in self.decays,
                 f"export: {self.export} is not one of decays {self.decays}; pick one of them or null (the first)")

@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global: micro_batch x accumulation x world size
    micro_batch_size: Union[int, None] = None  # per process and step of accumulation (default: all of it)
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights)
    compile: bool = False
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    threads: Union[int, None] = None  # torch CPU threads (default: leave as is)


    def __post_init__(self):
        _require(self.steps >= 1, f"steps: must be at least 1, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size: must be at least 1, got {self.batch_size}")
        _require(self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.batch_size,
                 f"micro_batch_size: must be between 1 and batch_size ({self.batch_size}) or null, "
                 f"got {self.micro_batch_size}")
        _require(self.threads is None or self.threads >= 1, f"threads: must be at least 1 or null, got {self.threads}")
        try:
            parse_device(self.device, field="device")  # the name only; whether this machine has it: at start
        except UserError as err:
            raise ConfigError(str(err)) from None

@dataclass
class LogConfig:
    every: int = 10  # metrics.jsonl + TensorBoard scalars
    tensorboard: bool = True
    progress: bool = True
    sigma_buckets: list = field(default_factory=lambda: [0.1, 0.5, 1.0, 2.0, 5.0])  # edges of loss-by-sigma
    sample_every: int = 0  # sample grids of sample_prompts (0: only at the end)
    sample_prompts: list = field(default_factory=list)
    sample_seed: int = 0


    def __post_init__(self):
        _require(self.every >= 1, f"every: must be at least 1 (metrics every N steps), got {self.every}")
        _require(self.sample_every >= 0, f"sample_every: must be >= 0 (0: only at the end), got {self.sample_every}")
        edges = self.sigma_buckets
        _require(all(isinstance(e, (int, float)) and e > 0 for e in edges) and list(edges) == sorted(set(edges)),
                 f"sigma_buckets: must be increasing positive numbers, got {edges}")
        _require(all(isinstance(p, str) and p.strip() for p in self.sample_prompts),
                 "sample_prompts: must be a list of non-empty prompts")

@dataclass
class CheckpointConfig:
    every: int = 500  # full training state
    keep_last: int = 2
    pipeline: bool = True  # also write the EMA weights as a pipeline folder


    def __post_init__(self):
        _require(self.every >= 0, f"every: must be >= 0 (0: only at the end), got {self.every}")
        _require(self.keep_last >= 1, f"keep_last: must be at least 1, got {self.keep_last}")

@dataclass
class SamplingConfig:  # the pipeline's defaults (and the grids logged during training)
    sampler: str = "heun"
    steps: int = 30
    guidance_scale: float = 5.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    truncate_sigma: Union[float, None] = None  # stop there and return x0_hat (e.g. every sample noisy at it)


    def __post_init__(self):
        _require(self.sampler in SAMPLERS, f"sampler: {lookup_message(self.sampler, SAMPLERS, 'sampler')}")
        _require(self.steps >= 1, f"steps: must be at least 1, got {self.steps}")
        _require(_finite(self.guidance_scale), f"guidance_scale: must be a finite number, got {self.guidance_scale}")
        _require(0 < self.sigma_min < self.sigma_max and _finite(self.sigma_max),
                 f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        _require(self.rho > 0, f"rho: must be > 0, got {self.rho}")
        _require(self.truncate_sigma is None or self.truncate_sigma > 0,
                 f"truncate_sigma: must be > 0 or null, got {self.truncate_sigma}")

@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block)
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ambient: AmbientConfig = field(default_factory=AmbientConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


CHOICES = {
    "model.parameterization": ("edm", "v", "eps", "x0"),
    "noise.distribution": ("lognormal", "cosine", "discrete", "loguniform"),
    "loss.weighting": ("natural", "edm", "eps", "v", "min_snr", "x0"),
    "loss.reduction": ("mean", "mean_per_sample", "sum_per_sample"),
    "ambient.target": ("tweedie", "plain"),
    "ambient.weighting": ("tweedie", "ambient_o"),
    "ambient.selection": ("sigma_first", "sample_first"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "train.precision": ("fp32", "bf16"),
    "distributed.strategy": ("ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


def _presets() -> list[str]:
    return [*DIT_PRESETS, *UNET_PRESETS]


def lookup_message(name: str, known, what: str) -> str:
    """"unknown <what> 'x'; did you mean 'y'? choose one of ..." for a name that is not in ``known``."""
    try:
        lookup(dict.fromkeys(known), name, what)
    except ValueError as err:
        return str(err)
    return ""


# ----------------------------------------------------------------------------- reading
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(str(p) for p in seen + (path,))})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not UTF-8 text); pass a .yaml file such as "
                          "configs/demo.yaml") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty; set at least the sections you mean (see configs/demo.yaml), "
                          "or start from another file with 'extends: other.yaml'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    return merge(_read_yaml(path.parent / base, seen + (path,)), data)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (["optim", "lr"], 3e-4)."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: write it as section.key=value, e.g. optim.lr=3e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def _apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict[str, Any] | None = None) -> RunConfig:
    """A validated RunConfig from a YAML file (or ``data``) plus ``key=value`` overrides."""
    merged = _read_yaml(Path(path)) if path is not None else {}
    merged = merge(merged, data or {})
    source = str(path) if path is not None else "config"
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(merged, keys, value)
    merged.pop("stages", None)
    return build(RunConfig, merged, source)


# ----------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null"}.get(tp, getattr(typing.get_origin(tp) or tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif (origin or tp) is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif (origin or tp) is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, naming the first unknown key or wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")
        tp = hints[key]
        where = f"{source}: {prefix}{key}"
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
            choices = CHOICES.get(f"{prefix}{key}")
            if choices and kwargs[key] not in choices:
                raise ConfigError(f"{where}: {kwargs[key]!r} is not one of {', '.join(choices)}")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a section's __post_init__ range check: "field: what is wrong and the fix"
        raise ConfigError(f"{source}: {prefix}{err}") from None


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def stage_files(path: str | Path) -> list[Path] | None:
    """The config files a stages file lists (``stages: [a.yaml, b.yaml]``), or None if it lists none."""
    path = Path(path)
    data = _read_yaml(path)
    stages = data.get("stages")
    if stages is None:
        return None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"{path}: stages must be a non-empty list of config file names")
    files = [(path.parent / s).resolve() for s in stages]
    for file in files:  # all of them before any stage trains
        if not file.is_file():
            raise ConfigError(f"{path}: stage {file} does not exist; fix the name in 'stages'")
        if "stages" in _read_yaml(file):
            raise ConfigError(f"{path}: stage {file.name} is itself a stages file; list its stages here instead")
    names = [f.stem for f in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: two stages are named {twice[0]!r} (each stage trains into OUT/<file name>); "
                          "rename one of the files")
    return files


def shared_sections(path: str | Path) -> dict[str, Any]:
    """What a stages file sets besides ``stages`` (and ``extends``): applied to every stage it lists."""
    data = _read_yaml(Path(path))
    data.pop("stages", None)
    return data


__all__ = ["RunConfig", "ModelConfig", "DataConfig", "EncoderConfig", "NoiseConfig", "LossConfig", "AmbientConfig",
           "OptimConfig",
           "EMAConfig", "TrainConfig", "LogConfig", "CheckpointConfig", "SamplingConfig", "DistributedConfig",
           "ConfigError", "load_config", "save_config", "to_dict", "merge", "parse_override", "build",
           "stage_files", "shared_sections"]
