"""Feature spaces for evaluation behind one protocol: ``features(images) -> (B, D)`` float32.

Every metric (FD, KID, precision/recall, Vendi, CLIP score) works in some feature space. A spec
string picks one; the object's ``name`` is what stats files record (and ``load_features`` accepts
it back):

  spec                          name                               features
  inception[:WEIGHTS.pth]       inception-fid                      FID Inception-v3 pool3 (2048), its own 299 px resize
  dinov2[:HUB_ID_OR_FOLDER]     dinov2:facebook/dinov2-large       CLS token of the last hidden state (after the final
                                                                   LayerNorm); bicubic antialiased resize to the
                                                                   processor's crop size, its mean/std
  clip[:HUB_ID_OR_FOLDER]       clip:openai/clip-vit-large-patch14 CLIPModel.get_image_features (projected, not
                                                                   normalised); CLIP's shortest-side resize, centre crop
  shapes[:RES]                  shapes-32                          the shapes recognition net (128), trained once into
                                                                   ``cache_dir`` (default runs/cache)
  pixels[:SIZE]                 pixels-8                           area-downsampled pixels (3 * SIZE * SIZE)
  pkg.module:callable           module:pkg.module:callable         your own: a function images -> (B, D), or a class /
                                                                   factory called with no args (or ``device=``)

    feats = load_features("dinov2", device="cuda")
    x = extract(feats, images_01, batch_size=64, progress=True)     # (N, D) float64 numpy
    clip = load_clip("clip")                                         # image features + clip.encode_text(prompts)

Images are (B, 3, H, W) floats in [0, 1] on any device (NOT the [-1, 1] of training); they are moved
to the features' device. Outputs are on that device, computed under ``torch.no_grad``.

DINOv2: EDM2's FD-DINOv2 uses the CLS embedding of ViT-L/14 at 224 px (``dinov2:facebook/dinov2-large``)
with this same torch resize (bicubic, antialias, no clamping) and the ImageNet mean/std; it is our
default, so FD-DINOv2 numbers compare with EDM2's and Ambient-o's. ``dinov2:facebook/dinov2-base``
(ViT-B/14) is cheaper, but its numbers are not comparable with theirs.
Any ``AutoModel`` vision transformer whose token 0 is a CLS token works the same way.

CLIP preprocessing mirrors ``CLIPImageProcessor`` in torch: the shorter side resized to
``size["shortest_edge"]`` (the longer one to ``int(s * long / short)``), bicubic with antialias,
clamped to [0, 1] as PIL's 8-bit result is, centre crop to ``crop_size``, then mean/std. It differs
from the PIL path by a few 8-bit steps per pixel, not in geometry.

Hub ids are read from the local Hugging Face cache (with HF_HUB_OFFLINE=1 nothing is downloaded):
fetch them once where there is internet (``huggingface-cli download ID``) or pass a local folder.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.text import hf_load_weights
from .images import as_image_batch

DEFAULT_DINOV2 = "facebook/dinov2-large"  # ViT-L/14, the network of EDM2's FD-DINOv2
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_SHAPES_RESOLUTION = 32
DEFAULT_PIXEL_SIZE = 8
DEFAULT_CACHE_DIR = "runs/cache"
CHOICES = ("inception[:WEIGHTS.pth]", "dinov2[:ID_OR_FOLDER]", "clip[:ID_OR_FOLDER]", "shapes[:RES]", "pixels[:SIZE]",
           "pkg.module:callable")
_MODULE_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# ----------------------------------------------------------------------------- the protocol

class Features:
    """A feature space: ``features(images)`` maps (B, 3, H, W) floats in [0, 1] to (B, D) float32.

    Subclasses set ``name`` (recorded in stats files), ``dim`` (None when unknown until the first
    call) and implement ``encode`` (any float dtype; ``extract`` keeps it, ``__call__`` casts)."""

    name: str = "features"
    dim: int | None = None
    input_size: int | None = None  # the square size images are best resized to first (eval fid does, clean-fid style)

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, images: Any) -> torch.Tensor:
        """Checked, device-moved, gradient-free ``encode``; the output dtype is the encoder's."""
        images = as_image_batch(images, self.name).to(self.device, torch.float32)
        with torch.no_grad():
            out = _as_output(self.encode(images), len(images), self.name)
        if self.dim is None:
            self.dim = out.shape[1]
        return out

    def __call__(self, images: Any) -> torch.Tensor:
        return self.compute(images).float()

    def to(self, device: str | torch.device) -> "Features":
        self.device = torch.device(device)
        for module in self._modules_to_move():
            module.to(self.device)
        return self

    def _modules_to_move(self) -> list:
        return [m for m in (getattr(self, "model", None),) if hasattr(m, "to")]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"


def _as_output(out: Any, batch: int, name: str) -> torch.Tensor:
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(f"{name}: the feature function must return a ({batch}, D) tensor for {batch} images; "
                         f"got {got}")
    return out if out.is_floating_point() else out.float()


# ----------------------------------------------------------------------------- built-in spaces

class InceptionFeatures(Features):
    """FID Inception-v3 pool3 (B, 2048); the network resizes to 299 px itself."""

    name, dim, input_size = "inception-fid", 2048, 299

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model = model.to(self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class PixelFeatures(Features):
    """``pixel_features``: area means down to size x size, (B, 3 * size^2), float64 on the CPU."""

    def __init__(self, size: int = DEFAULT_PIXEL_SIZE, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.size, self.name, self.dim = size, f"pixels-{size}", 3 * size * size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        from .frechet import pixel_features

        if min(images.shape[-2:]) < self.size:
            raise ValueError(f"pixels:{self.size}: the images are {images.shape[-2]} x {images.shape[-1]}, smaller than "
                             f"{self.size}; pass --resolution {self.size} or more, or a smaller pixels:SIZE")
        return pixel_features(images, self.size)


class ShapesFeatures(Features):
    """The shapes recognition net's 128-d features; images must be at the net's resolution."""

    def __init__(self, net: torch.nn.Module, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model = net.eval().requires_grad_(False).to(self.device)
        self.name, self.dim, self.input_size = f"shapes-{net.resolution}", 128, net.resolution

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        res = self.model.resolution
        if images.shape[-2:] != (res, res):
            raise ValueError(f"{self.name}: images must be {res} x {res}; got {tuple(images.shape[-2:])} "
                             f"(use shapes:{images.shape[-1]} for that resolution)")
        return self.model.features(images)


class HFVisionFeatures(Features):
    """Shared by the transformers-backed spaces: a resize/crop/normalise done in torch, then ``embed``."""

    def __init__(self, model: torch.nn.Module, name: str, mean, std, resize: tuple | int, crop: tuple | None,
                 mode: str = "bicubic", clamp: bool = False, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.name, self.resize, self.crop, self.mode, self.clamp = name, resize, crop, mode, clamp
        self.input_size = int(crop[0]) if crop is not None else (resize if isinstance(resize, int) else int(resize[0]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's ``pixel_values``. ``resize`` is (h, w) or an int
        shortest side; ``crop`` is a centre crop (h, w) or None."""
        h, w = images.shape[-2:]
        if isinstance(self.resize, int):
            short, long = (h, w) if h <= w else (w, h)
            long = int(self.resize * long / short)
            size = (self.resize, long) if h <= w else (long, self.resize)
        else:
            size = tuple(self.resize)
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True)
        if self.clamp:
            x = x.clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > x.shape[-2] or cw > x.shape[-1]:
                raise ValueError(f"{self.name}: crop {ch} x {cw} is larger than the resized image "
                                 f"{tuple(x.shape[-2:])}; check the processor's size and crop_size")
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images))


class Dinov2Features(HFVisionFeatures):
    """DINOv2 (any ``AutoModel`` ViT with a CLS token): ``last_hidden_state[:, 0]``, i.e. the CLS
    token after the final LayerNorm, as EDM2's FD-DINOv2 (``x_norm_clstoken``)."""

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipFeatures(HFVisionFeatures):
    """CLIP image embeddings (``get_image_features``: the projected, unnormalised embedding) and,
    from the same model, text embeddings via ``encode_text``."""

    def __init__(self, *args: Any, path: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.path, self.tokenizer = path, None

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(B, D) float32 projected text embeddings (``get_text_features``); captions longer than the
        model's context (77 tokens for OpenAI CLIP) are truncated."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{self.name}: encode_text takes a list of strings; got {type(texts).__name__}")
        if self.tokenizer is None:
            import transformers

            self.tokenizer = _hf_load(transformers.AutoTokenizer.from_pretrained, self.path, self.name, "tokenizer")
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=min(int(self.tokenizer.model_max_length), limit))
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                               attention_mask=tokens["attention_mask"].to(self.device))
        return _pooled(out).float()

    @property
    def text(self) -> "ClipTextFeatures":
        return ClipTextFeatures(self)


class ClipTextFeatures:
    """The text side of a ``ClipFeatures``: ``encode_text(texts)`` (or calling it) -> (B, D) float32,
    in the same embedding space as the image features (same model object)."""

    def __init__(self, clip: ClipFeatures):
        self.clip, self.model = clip, clip.model
        self.name, self.dim = clip.name.replace("clip:", "clip-text:", 1), clip.dim

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_text(texts)

    __call__ = encode_text


def _pooled(out: Any) -> torch.Tensor:
    """transformers < 5 returns the projected tensor; 5.x a ModelOutput whose pooler_output is it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CallableFeatures(Features):
    """A user's callable images -> (B, D) (tensor or array); ``dim`` from its ``dim`` attribute,
    else filled in by the first call."""

    def __init__(self, fn: Callable, name: str, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.fn, self.name = fn, name
        self.dim = getattr(fn, "dim", None)
        if isinstance(fn, torch.nn.Module):
            fn.eval().requires_grad_(False).to(self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)

    def _modules_to_move(self) -> list:
        return [self.fn] if hasattr(self.fn, "to") else []


# ----------------------------------------------------------------------------- loading

def load_features(spec: str, device: str | torch.device = "cpu", **options: Any) -> Features:
    """The feature space named by ``spec`` (see the module docstring), on ``device``.

    Options: ``cache_dir`` and ``progress`` for shapes; anything else is passed to a user factory."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"feature spec must be a non-empty string, one of {', '.join(CHOICES)}; got {spec!r}")
    spec = spec.strip()
    spec = {"inception-fid": "inception"}.get(spec, re.sub(r"^(shapes|pixels)-(\d+)$", r"\1:\2", spec))  # names
    kind, _, arg = spec.partition(":")
    loaders = {"inception": _load_inception, "dinov2": _load_dinov2, "clip": _load_clip, "shapes": _load_shapes,
               "pixels": _load_pixels}
    if kind in loaders:
        loader = loaders[kind]
        accepted = [p for p in inspect.signature(loader).parameters if p not in ("arg", "device")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"{spec}: unknown option(s) {', '.join(unknown)}; {kind} takes "
                             f"{', '.join(accepted) or 'no options'}")
        return loader(arg, device=device, **options)
    if kind == "module":
        spec = arg
    if _MODULE_SPEC.fullmatch(spec):
        return _load_module(spec, device, **options)
    raise ValueError(f"unknown feature spec {spec!r}; use one of {', '.join(CHOICES)}")


def quiet_hub_progress() -> None:
    """Turn off the progress bars transformers and huggingface_hub print while loading a model (the eval
    commands' --quiet); for the rest of the process."""
    for module, name in (("transformers.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
        try:
            getattr(importlib.import_module(module), name)()
        except (ImportError, AttributeError):
            pass


def load_clip(spec: str = "clip", device: str | torch.device = "cpu") -> ClipFeatures:
    """CLIP image features with ``encode_text`` (and ``.text``, a ``ClipTextFeatures``) from one model."""
    features = load_features(spec if spec == "clip" or spec.startswith("clip:") else f"clip:{spec}", device)
    if not isinstance(features, ClipFeatures):
        raise ValueError(f"load_clip needs a clip spec (clip or clip:ID_OR_FOLDER); got {spec!r}")
    return features


def _load_inception(arg: str, device: str | torch.device = "cpu") -> InceptionFeatures:
    from . import inception

    return InceptionFeatures(inception.load_fid_inception(arg or None, device=device), device)


def _whole_number(arg: str, default: int, kind: str) -> int:
    if not arg:
        return default
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"{kind}:{arg}: the part after the colon must be a whole number of pixels, e.g. "
                         f"{kind}:{default}")
    return int(arg)


def _load_pixels(arg: str, device: str | torch.device = "cpu") -> PixelFeatures:
    return PixelFeatures(_whole_number(arg, DEFAULT_PIXEL_SIZE, "pixels"), device)


def _load_shapes(arg: str, device: str | torch.device = "cpu", cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                 progress: bool = False) -> ShapesFeatures:
    from . import shapes_features

    resolution = _whole_number(arg, DEFAULT_SHAPES_RESOLUTION, "shapes")
    return ShapesFeatures(shapes_features.shapes_feature_net(cache_dir, resolution, progress=progress), device)


def _major(version: str) -> int:
    return int(re.match(r"\d+", version).group())


def _hf_source(kind: str, arg: str, default: str) -> tuple[str, str]:
    """(path for from_pretrained, name): a folder becomes absolute; a hub id stays as it is."""
    source = arg or default
    local = os.path.expanduser(source)
    if os.path.isdir(local):
        path = os.path.abspath(local)
        return path, f"{kind}:{path}"
    if source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise FileNotFoundError(f"{kind}:{source}: the folder does not exist; pass a folder written by "
                                f"save_pretrained or a hub id such as {default}")
    return source, f"{kind}:{source}"


def _hf_load(loader: Callable, path: str, name: str, what: str, **kwargs: Any) -> Any:
    """``loader(path)`` with a one-line error for a folder lacking files or a hub id not in the cache."""
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if os.path.isdir(path):
            raise FileNotFoundError(f"{name}: cannot load the {what} from {path} ({reason}); the folder needs the "
                                    "files save_pretrained writes (config, weights, preprocessor_config.json)"
                                    ) from None
        if not isinstance(err, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        raise FileNotFoundError(
            f"{name}: not in the local Hugging Face cache (no {what}{'; HF_HUB_OFFLINE is set' if offline else ''})"
            f"; download it once where there is internet (huggingface-cli download {path}) or pass a local "
            f"folder ({name.split(':')[0]}:/path/to/folder)") from None


def _processor(path: str, name: str) -> Any:
    import transformers

    backend = {"backend": "pil"} if _major(transformers.__version__) >= 5 else {"use_fast": False}  # no torchvision
    return _hf_load(transformers.AutoImageProcessor.from_pretrained, path, name, "image processor", **backend)


def _size(size: Any, key: str) -> int | None:
    """A field of an image processor's size dict (a plain dict in transformers 4, a SizeDict in 5)."""
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return None if value is None else int(value)


def _load_dinov2(arg: str, device: str | torch.device = "cpu") -> Dinov2Features:
    import transformers

    path, name = _hf_source("dinov2", arg, DEFAULT_DINOV2)
    config = _hf_load(transformers.AutoConfig.from_pretrained, path, name, "config")
    if any(k in config.model_type for k in ("clip", "siglip")):
        raise ValueError(f"{name} is a {config.model_type!r} model; use clip:{name.split(':', 1)[1]} for CLIP "
                         "image features")
    model = hf_load_weights(transformers.AutoModel.from_pretrained, path, name, wrap=_hf_load,
                            dtype=torch.float32)  # strict
    proc = _processor(path, name)
    crop = getattr(proc, "crop_size", None) or proc.size
    size = (_size(crop, "height"), _size(crop, "width"))
    if None in size:
        edge = _size(crop, "shortest_edge")
        size = (edge, edge)
    features = Dinov2Features(model, name, proc.image_mean, proc.image_std, resize=size, crop=None, device=device)
    features.dim = int(config.hidden_size)
    return features


def _load_clip(arg: str, device: str | torch.device = "cpu") -> ClipFeatures:
    import transformers

    path, name = _hf_source("clip", arg, DEFAULT_CLIP)
    model = hf_load_weights(transformers.CLIPModel.from_pretrained, path, name, wrap=_hf_load,
                            dtype=torch.float32)  # strict
    proc = _processor(path, name)
    edge = _size(proc.size, "shortest_edge")
    resize = edge if edge is not None else (_size(proc.size, "height"), _size(proc.size, "width"))
    crop = (_size(proc.crop_size, "height"), _size(proc.crop_size, "width")) if proc.do_center_crop else None
    mode = "bilinear" if int(getattr(proc, "resample", 3)) == 2 else "bicubic"
    features = ClipFeatures(model, name, proc.image_mean, proc.image_std, resize=resize, crop=crop, mode=mode,
                            clamp=True, device=device, path=path)
    features.dim = int(model.config.projection_dim)
    return features


def _load_module(spec: str, device: str | torch.device = "cpu", **options: Any) -> CallableFeatures:
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"unknown feature spec {spec!r} (module {module_name!r} cannot be imported: {reason}); "
                         f"use one of {', '.join(CHOICES)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec}: {attr} is a {type(obj).__name__}, not a callable mapping images to features")
    if inspect.isclass(obj) or not _takes_positional(obj):  # a class or a factory: build the callable
        kwargs = dict(options)
        if _accepts(obj, "device"):
            kwargs["device"] = device
        obj = obj(**kwargs)
        if not callable(obj):
            raise ValueError(f"{spec}: calling {attr}() returned a {type(obj).__name__}, not a callable "
                             "images -> (B, D)")
    elif options:
        raise ValueError(f"{spec}: options {', '.join(sorted(options))} given but {attr} is a feature function, "
                         "not a factory that takes them")
    return CallableFeatures(obj, f"module:{spec}", device)


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _takes_positional(fn: Callable) -> bool:
    """True if ``fn`` has a required positional parameter (then it is the feature function itself)."""
    sig = _signature(fn)
    return sig is None or any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                              for p in sig.parameters.values())


def _accepts(fn: Callable, name: str) -> bool:
    sig = _signature(fn)
    return sig is not None and any(p.name == name or p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


# ----------------------------------------------------------------------------- extraction

def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    """Slices of a tensor/array, or an iterable's items (a tuple/list item gives its first entry, as a
    DataLoader of (images, labels) does), each cut into at most ``batch_size`` images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = [images]
    for item in images:
        if isinstance(item, (tuple, list)):
            item = item[0]
        for i in range(0, len(item), batch_size):
            yield item[i:i + batch_size]


def extract(features: Callable, images: Any, batch_size: int = 64, progress: bool = False,
            total: int | None = None) -> np.ndarray:
    """(N, D) float64 features of ``images``: a (N, 3, H, W) tensor/array in [0, 1] or an iterable of
    such batches, run ``batch_size`` at a time. ``progress`` shows a tqdm bar (images/s and ETA; give
    ``total`` for an ETA over an iterable). Works with any callable images -> (B, D)."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1; got {batch_size!r}")
    if isinstance(images, (torch.Tensor, np.ndarray)):
        total = len(images)
    name = getattr(features, "name", type(features).__name__)
    run = features.compute if isinstance(features, Features) else features
    chunks = []
    with tqdm(total=total, desc=f"features {name}", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in _batches(images, batch_size):
            out = _as_output(run(batch), len(batch), name)
            chunks.append(out.detach().to("cpu", torch.float64))
            bar.update(len(batch))
    if not chunks:
        return np.zeros((0, getattr(features, "dim", None) or 0), dtype=np.float64)
    return torch.cat(chunks).numpy()


def check_finite(feats: Any, labels: list, space: str, kind: str = "image") -> None:
    """Features must be finite: NaN or inf (damaged weights, a broken custom network) would make every
    metric NaN or silently wrong. One line naming the model when every row is bad, else the first input."""
    values = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if not len(values):
        return
    bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not bad.any():
        return
    first = labels[int(np.flatnonzero(bad)[0])]
    if bad.all():
        raise ValueError(f"{space}: gives NaN or infinite {kind} features for every input ({len(values)} of "
                         f"{len(values)}, first {first}); its weights are damaged or it does not fit these inputs: "
                         "fetch or save the model again, or pass other --features")
    raise ValueError(f"{first}: {space} gives NaN or infinite {kind} features for it ({int(bad.sum())} of "
                     f"{len(values)} inputs); check it, or pass other --features")


def spec_of(name: str) -> str:
    """The ``--features`` spec that gives the feature space recorded as ``name`` (pixels-8 -> pixels:8,
    shapes-32 -> shapes:32, inception-fid -> inception, module:pkg.mod:fn -> pkg.mod:fn)."""
    if name == "inception-fid":
        return "inception"
    match = re.fullmatch(r"(shapes|pixels)-(\d+)", name)
    if match:
        return f"{match[1]}:{match[2]}"
    return name[len("module:"):] if name.startswith("module:") else name


__all__ = ["Features", "InceptionFeatures", "Dinov2Features", "ClipFeatures", "ClipTextFeatures", "ShapesFeatures",
           "PixelFeatures", "CallableFeatures", "load_features", "load_clip", "extract", "DEFAULT_DINOV2",
           "DEFAULT_CLIP", "check_finite", "spec_of", "quiet_hub_progress"]
