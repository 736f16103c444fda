"""Surrogate image encoders: frozen feature extractors for the Unlearnable Clusters method.

An encoder maps images to feature vectors. Unlearnable Clusters uses one three times: to embed the
training set before K-means (``encode``), inside the generator's loss with gradients w.r.t. the
input (``forward``), and at apply time to assign new images to the nearest cluster center.

An `EncoderSpec` names the encoder and its preprocessing; it is JSON-serialisable so that a fitted
protection can record which surrogate it was fitted with, and `load_encoder` checks the weights'
digest against it. Spec strings (`parse_encoder`):

* ``open_clip:MODEL:TAG`` (e.g. ``open_clip:RN50:openai``): weights from the local Hugging Face cache;
  downloaded only when the Hub is reachable (checked first, 3 s timeout), never retried for long.
* ``open_clip:MODEL:/path/to/checkpoint.{pt,bin,safetensors}``: a local state dict for MODEL.
* ``local-dir:/path`` (or ``open_clip:local-dir:/path``): an open_clip bundle directory holding
  ``open_clip_config.json`` and ``open_clip_model.safetensors``; its ``preprocess_cfg`` is used.
* ``torchvision:NAME:/path/weights.{pth,pt,safetensors}``; ``torchvision:NAME:WEIGHTS_ENUM`` (e.g.
  ``IMAGENET1K_V2``) is accepted only when torchvision's cache already holds the file. Plain
  ``torchvision:NAME`` is a seeded random network, for tests only: loading it warns
  (`RandomEncoderWarning`).

OpenAI weights were trained with QuickGELU, which only open_clip's ``-quickgelu`` configs build. A
pretrained tag sets it by itself (``open_clip:RN50:openai``); a checkpoint file cannot tell, so name the
QuickGELU config with it: ``open_clip:RN50-quickgelu:/models/rn50-openai.pt`` (for ResNets only the
unused text tower differs, for ViTs the image features do).

Nothing here downloads without a reachable network, and nothing unpickles: checkpoints load with
``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UEDatasetsError

KINDS = ("open_clip", "torchvision", "callable")
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Seconds allowed for the check that the Hugging Face Hub is reachable before any download.
HUB_CHECK_TIMEOUT = 3.0
#: Seed of the random initialisation of ``torchvision:NAME`` (no weights), so that it is reproducible.
RANDOM_INIT_SEED = 0

_ACCEPTED = (
    "accepted encoder specs: 'open_clip:MODEL:TAG' (e.g. open_clip:RN50:openai), "
    "'open_clip:MODEL:/path/to/checkpoint.pt', 'local-dir:/path/to/open_clip_bundle', "
    "'torchvision:NAME' (random init, tests only), 'torchvision:NAME:/path/weights.pth'"
)


class EncoderError(UEDatasetsError):
    """An encoder spec is malformed, its weights cannot be reached, or they differ from the expected ones."""


class RandomEncoderWarning(UserWarning):
    """An encoder was built without weights: a random network, whose clusters mean nothing."""


def _checkpoint_model(model: str | None, tag: str | None) -> str:
    """The open_clip model name to give with a checkpoint file of ``model``'s ``tag`` weights: its
    ``-quickgelu`` config when the tag was trained with QuickGELU (OpenAI's), which a file cannot tell."""
    if not model or not tag or _is_path(tag):
        return model or "MODEL"
    open_clip = _import_open_clip()
    quick = f"{model}-quickgelu"
    if (
        (open_clip.get_pretrained_cfg(model, tag) or {}).get("quick_gelu")
        and not (open_clip.get_model_config(model) or {}).get("quick_gelu")
        and quick in open_clip.list_models()
    ):
        return quick
    return model


def _local_weights_hint(model: str | None = None, tag: str | None = None) -> str:
    m, t = _checkpoint_model(model, tag), tag or "TAG"
    quick = "the QuickGELU config these weights were trained with; " if m != (model or "MODEL") else ""
    return (
        "Point at local weights instead: "
        f"'open_clip:{m}:/path/to/checkpoint.pt' ({quick}made on a machine with internet by "
        f"`m = open_clip.create_model('{m}', pretrained='{t}'); torch.save(m.state_dict(), 'checkpoint.pt')`), "
        "or 'local-dir:/path' (an open_clip bundle: open_clip_config.json + open_clip_model.safetensors), "
        "or a torchvision surrogate: '--encoder torchvision:resnet50:/path/weights.pth'."
    )


# --------------------------------------------------------------------------------------------- spec


def _floats3(v: Any, what: str) -> tuple[float, ...]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError as e:
        raise EncoderError(f"encoder {what} must be 3 numbers, got {v!r}") from e
    if len(t) != 3:
        raise EncoderError(f"encoder {what} must be 3 numbers, got {v!r}")
    return t


@dataclass(frozen=True)
class EncoderSpec:
    """What encoder to build and how to preprocess its input; JSON round-trips.

    Attributes:
        kind: ``"open_clip"``, ``"torchvision"`` or ``"callable"``.
        name: open_clip model name (``"RN50"``) or ``"local-dir:/abs/path"``; torchvision model name
            (``"resnet50"``); a display name for callables.
        weights: open_clip: pretrained tag (``"openai"``) or absolute checkpoint path (None for
            ``local-dir``); torchvision: absolute weights path, or None for a seeded random init
            (only meant for tests); callable: None.
        size: side of the square input the encoder sees.
        mean, std: 3 per-channel normalisation values, applied to pixels in [0, 1].
        resize_mode: ``"shortest"`` (shorter side to ``size``, then center crop) or ``"squash"``
            (resize to ``size`` x ``size``).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        weights_digest: ``sha256:<hex>`` over the model's state_dict; `load_encoder` fills it and
            refuses weights that differ from a set one.
        model_config: open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) so that
            the spec is self-describing: `load_encoder` registers it with open_clip when open_clip does
            not know the name (or knows a different config under it). None for other kinds.
    """

    kind: str
    name: str
    weights: str | None
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    weights_digest: str | None = None
    model_config: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EncoderError(f"encoder kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name:
            raise EncoderError("encoder name must be a non-empty string")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise EncoderError(f"encoder size must be a positive integer, got {self.size!r}")
        mean, std = _floats3(self.mean, "mean"), _floats3(self.std, "std")
        if any(s <= 0 for s in std):
            raise EncoderError(f"encoder std must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.resize_mode not in RESIZE_MODES:
            raise EncoderError(f"encoder resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise EncoderError(
                f"encoder interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if self.weights_digest is not None and not str(self.weights_digest).startswith("sha256:"):
            raise EncoderError(f"encoder weights_digest must be 'sha256:<hex>', got {self.weights_digest!r}")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise EncoderError("encoder model_config must be a dict or None")

    def to_json(self) -> dict:
        """A JSON-serialisable dict (lists for mean/std) that `from_json` turns back into this spec."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> EncoderSpec:
        """Inverse of `to_json`; unknown keys are an error."""
        if not isinstance(d, dict):
            raise EncoderError(f"encoder spec JSON must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EncoderError(f"unknown encoder spec fields {sorted(unknown)}")
        missing = {"kind", "name", "weights", "size", "mean", "std"} - set(d)
        if missing:
            raise EncoderError(f"encoder spec JSON lacks {sorted(missing)}")
        return cls(**d)

    def __str__(self) -> str:
        w = f":{self.weights}" if self.weights else ""
        return f"{self.kind}:{self.name}{w}"


# ------------------------------------------------------------------------------------------ parsing


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EncoderError("open_clip encoders need open_clip_torch: pip install open_clip_torch") from e
    return open_clip


def _is_path(s: str) -> bool:
    return os.path.isfile(s) or "/" in s or os.sep in s or s.lower().endswith(WEIGHT_SUFFIXES)


def _abs_file(s: str, what: str) -> str:
    p = Path(s).expanduser()
    if not p.is_file():
        raise EncoderError(f"{what} not found: {str(p)!r} (no such file)")
    return str(p.resolve())


def _square_size(v: Any, where: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or int(v[0]) != int(v[1]):
            raise EncoderError(f"{where}: only square inputs are supported, got image size {v!r}")
        v = v[0]
    return int(v)


def _interp_name(v: Any) -> str:
    s = str(v).lower()
    s = s.rsplit(".", 1)[-1]  # InterpolationMode.BILINEAR -> bilinear
    return s


def _finish(
    kind: str, name: str, weights: str | None, base: dict, model_config: dict | None, over: dict
) -> EncoderSpec:
    """Merge preprocessing ``base`` with the non-None overrides and build the spec."""
    merged = dict(base)
    merged.update({k: v for k, v in over.items() if v is not None})
    return EncoderSpec(
        kind=kind,
        name=name,
        weights=weights,
        size=int(merged["size"]),
        mean=merged["mean"],
        std=merged["std"],
        resize_mode=merged["resize_mode"],
        interpolation=_interp_name(merged["interpolation"]),
        model_config=model_config,
    )


def _known_models_hint(open_clip) -> str:
    names = open_clip.list_models()
    common = [
        n for n in ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu") if n in names
    ]
    return f"known models include {', '.join(common)} ({len(names)} in all: open_clip.list_models())"


def _parse_local_dir(path: str, over: dict) -> EncoderSpec:
    _import_open_clip()
    if not path:
        raise EncoderError("empty path after 'local-dir:'; " + _ACCEPTED)
    d = Path(path).expanduser()
    cfg_path = d / "open_clip_config.json"
    if not d.is_dir():
        raise EncoderError(f"open_clip bundle directory not found: {str(d)!r}")
    if not cfg_path.is_file():
        raise EncoderError(f"open_clip bundle {str(d)!r} has no open_clip_config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_cfg = cfg["model_cfg"]
    except (ValueError, KeyError, TypeError) as e:
        raise EncoderError(
            f"{str(cfg_path)!r} is not a valid open_clip config (needs 'model_cfg'): {e}"
        ) from e
    if not any(f.suffix in (".safetensors", ".bin", ".pth") for f in d.iterdir() if f.is_file()):
        raise EncoderError(
            f"open_clip bundle {str(d)!r} holds no weights (open_clip_model.safetensors); "
            "open_clip would silently initialise the model randomly"
        )
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg") or {})
    pp["size"] = _square_size(
        (cfg.get("preprocess_cfg") or {}).get("size")
        or model_cfg.get("vision_cfg", {}).get("image_size", pp["size"]),
        str(cfg_path),
    )
    return _finish("open_clip", f"local-dir:{d.resolve()}", None, pp, model_cfg, over)


def _parse_open_clip(rest: str, over: dict) -> EncoderSpec:
    if rest.startswith("local-dir:"):
        return _parse_local_dir(rest[len("local-dir:") :], over)
    open_clip = _import_open_clip()
    name, _, weights = rest.partition(":")
    if not name:
        raise EncoderError("missing open_clip model name in 'open_clip:'; " + _ACCEPTED)
    if name == "hf-hub":
        raise EncoderError(
            "'hf-hub:' open_clip models are not supported (no network); download the repository and "
            "use 'local-dir:/path/to/it'"
        )
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise EncoderError(f"unknown open_clip model {name!r}; {_known_models_hint(open_clip)}")
    if not weights:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise EncoderError(
            f"open_clip:{name} needs weights: random initialisation is not allowed for open_clip "
            f"surrogates. Give a pretrained tag ('open_clip:{name}:TAG', tags: {tags or 'none'}) or a "
            f"checkpoint ('open_clip:{name}:/path/to/checkpoint.pt')."
        )
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), model_cfg.get("preprocess_cfg") or {})
    if _is_path(weights):
        weights = _abs_file(weights, f"open_clip checkpoint for {name}")
    else:
        tag_cfg = open_clip.get_pretrained_cfg(name, weights)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise EncoderError(
                f"{weights!r} is neither a pretrained tag of open_clip model {name!r} (tags: {tags or 'none'}) "
                f"nor an existing checkpoint file"
            )
        pp = merge_preprocess_dict(pp, tag_cfg)
        if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
            # open_clip only warns about this mismatch and builds GELU: features would be wrong.
            model_cfg["quick_gelu"] = True
    pp["size"] = _square_size(
        model_cfg.get("vision_cfg", {}).get("image_size", pp["size"]), f"open_clip:{name}"
    )
    return _finish("open_clip", name, weights, pp, model_cfg, over)


def _torchvision_cached_weights(name: str, enum_name: str) -> tuple[str, dict]:
    """Resolve a torchvision weights enum name to its file in torch's hub cache (no download)."""
    import torchvision

    try:
        w = torchvision.models.get_model_weights(name)[enum_name]
    except (KeyError, ValueError) as e:
        raise EncoderError(
            f"{enum_name!r} is neither a local weights file nor a torchvision weights name of {name!r}"
        ) from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(w.url).path)
    if not path.is_file():
        raise EncoderError(
            f"torchvision weights {name}:{enum_name} are not in the local cache ({str(path)!r}) and are "
            f"not downloaded here. Give a local file: 'torchvision:{name}:/path/weights.pth' (made on a "
            f"machine with internet by `torch.save(torchvision.models.{name}(weights='{enum_name}')"
            f".state_dict(), 'weights.pth')`)."
        )
    t = w.transforms()
    pp = {
        "size": int(t.crop_size[0]),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": _interp_name(t.interpolation),
    }
    return str(path.resolve()), pp


def _parse_torchvision(rest: str, over: dict) -> EncoderSpec:
    import torchvision

    name, _, weights = rest.partition(":")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise EncoderError(
            f"unknown torchvision classification model {name!r}; known models include "
            f"resnet18, resnet50, vit_b_16, efficientnet_b0 ({len(known)} in all: "
            "torchvision.models.list_models(module=torchvision.models))"
        )
    pp: dict[str, Any] = {
        "size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize_mode": "shortest",
        "interpolation": "bilinear",
    }
    path: str | None = None
    if weights:
        if _is_path(weights):
            path = _abs_file(weights, f"torchvision weights for {name}")
        else:
            path, enum_pp = _torchvision_cached_weights(name, weights)
            pp.update(enum_pp)
    return _finish("torchvision", name, path, pp, None, over)


def parse_encoder(
    spec: str,
    *,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_mode: str | None = None,
    interpolation: str | None = None,
) -> EncoderSpec:
    """Parse an encoder spec string (see the module docstring) into an `EncoderSpec`; loads no weights.

    Preprocessing defaults: open_clip from the tag's pretrained config, else the model config's
    ``preprocess_cfg``, else open_clip's (OpenAI mean/std, bicubic, shortest) with the model's image
    size; note that a checkpoint *file* carries no preprocessing, so give the tag's mean/std/resize_mode
    when they are not OpenAI's (e.g. SigLIP: 0.5/0.5, squash). ``local-dir``: the bundle's
    ``preprocess_cfg``. torchvision: 224, ImageNet mean/std, bilinear, shortest (the Unlearnable
    Clusters reference uses Resize 256 -> CenterCrop 224; "shortest" at 224 approximates it).
    Keyword arguments, when not None, override the defaults.

    Raises:
        EncoderError: malformed spec, unknown model or tag, missing checkpoint file.
    """
    over = {
        "size": size,
        "mean": mean,
        "std": std,
        "resize_mode": resize_mode,
        "interpolation": interpolation,
    }
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderError(f"empty encoder spec {spec!r}; {_ACCEPTED}")
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise EncoderError(f"bad encoder spec {spec!r}; {_ACCEPTED}")
    if kind == "local-dir":
        return _parse_local_dir(rest, over)
    if kind == "open_clip":
        return _parse_open_clip(rest, over)
    if kind == "torchvision":
        if not rest:
            raise EncoderError(f"missing torchvision model name in {spec!r}; {_ACCEPTED}")
        return _parse_torchvision(rest, over)
    raise EncoderError(f"bad encoder spec {spec!r}; {_ACCEPTED}")


# ---------------------------------------------------------------------------------------- encoders


def _state_dict_digest(module: nn.Module) -> str:
    """``sha256:<hex>`` over every tensor of ``module.state_dict()``: sorted names, dtype, shape, bytes."""
    h = hashlib.sha256()
    sd = module.state_dict()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)], separators=(",", ":")).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class Encoder(nn.Module):
    """A frozen surrogate: preprocessing plus a feature extractor, always in eval mode.

    ``train()`` is ignored (batch-norm statistics of a surrogate must not change); parameters do not
    require grad, but `forward` is differentiable w.r.t. a float input.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module | None,
        mode: str,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dim: int | None = None,
    ):
        super().__init__()
        if mode not in ("open_clip", "module", "callable"):
            raise EncoderError(f"unknown encoder mode {mode!r}")
        self.spec = spec
        self.model = model
        self._mode = mode
        self._fn = fn
        self._dim = dim
        device = _module_device(model) if model is not None else torch.device("cpu")
        self.register_buffer(
            "_mean",
            torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "_std",
            torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            persistent=False,
        )
        super().train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Ignored: the encoder always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device the encoder computes on."""
        return self._mean.device

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        if self._dim is None:
            with torch.inference_mode():
                x = torch.zeros(1, 3, self.spec.size, self.spec.size, device=self.device)
                self._dim = int(self.features(x).shape[-1])
        return self._dim

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize, crop and normalise a batch of images.

        Args:
            x: ``(B, C, H, W)`` uint8 in 0..255 or float in [0, 1]; C = 1 (gray, repeated), 2 (gray +
                alpha: gray repeated), 3 (RGB) or 4 (RGBA: alpha dropped).

        Returns:
            ``(B, 3, size, size)`` float32, normalised with the spec's mean/std, on ``x``'s device.
            Differentiable w.r.t. a float ``x``; uint8 is converted to float before resizing, so
            ``x`` and ``x.float() / 255`` give the same result.
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise EncoderError(
                f"encoder input must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}"
            )
        c = x.shape[1]
        if c in (1, 2):
            x = x[:, :1].expand(-1, 3, -1, -1)
        elif c == 4:
            x = x[:, :3]
        elif c != 3:
            raise EncoderError(f"encoder input must have 1 to 4 channels, got {c}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
        else:
            raise EncoderError(f"encoder input must be uint8 or float, got {x.dtype}")
        s = self.spec.size
        h, w = x.shape[-2:]
        if (h, w) != (s, s):
            interp = InterpolationMode(self.spec.interpolation)
            antialias = self.spec.interpolation != "nearest"
            if self.spec.resize_mode == "squash":
                x = TF.resize(x, [s, s], interpolation=interp, antialias=antialias)
            else:
                if min(h, w) != s:
                    x = TF.resize(x, [s], interpolation=interp, antialias=antialias)
                x = TF.center_crop(x, [s, s])
            if self.spec.interpolation == "bicubic":
                x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 pipeline clips
        mean, std = self._mean.to(x.device), self._std.to(x.device)
        return (x - mean) / std

    def features(self, x_pre: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, S, S)`` float -> ``(B, D)`` float32 features, not L2-normalised."""
        if self._mode == "open_clip":
            z = self.model.encode_image(x_pre, normalize=False)
        elif self._mode == "module":
            z = self.model(x_pre)
        else:
            z = self._fn(x_pre)
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != x_pre.shape[0]:
            raise EncoderError(
                f"encoder {self.spec.name!r} must return (B, D) features, got {getattr(z, 'shape', type(z))}"
            )
        return z.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``features(preprocess(x))``: ``(B, C, H, W)`` images -> ``(B, D)`` float32; differentiable
        w.r.t. a float ``x`` in [0, 1]."""
        return self.features(self.preprocess(x))

    def encode(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        """Embed images without gradients, batch by batch on the encoder's device.

        Args:
            images: ``(B, C, H, W)`` or a sequence of ``(C, H, W)`` uint8/float tensors of mixed sizes.
            batch_size: images per forward pass.

        Returns:
            ``(N, D)`` float32 on CPU, in input order (an ordinary tensor, not an inference tensor).
        """
        return self._encode(images, batch_size).clone()

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
        if batch_size <= 0:
            raise EncoderError(f"batch_size must be positive, got {batch_size}")
        dev = self.device
        n = len(images)
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise EncoderError(
                f"encode expects (B, C, H, W) or a list of (C, H, W), got {tuple(images.shape)}"
            )
        if n == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        out = []
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            if isinstance(images, torch.Tensor):
                pre = self.preprocess(chunk.to(dev, non_blocking=True))
            else:
                groups: dict[tuple, list[int]] = {}
                for i, im in enumerate(chunk):
                    if not isinstance(im, torch.Tensor) or im.ndim != 3:
                        raise EncoderError(
                            f"encode expects (C, H, W) tensors in a list, got {getattr(im, 'shape', type(im))} "
                            f"at index {start + i}"
                        )
                    groups.setdefault((tuple(im.shape), im.dtype), []).append(i)
                pre = torch.empty(len(chunk), 3, self.spec.size, self.spec.size, device=dev)
                for idx in groups.values():
                    batch = torch.stack([chunk[i] for i in idx]).to(dev, non_blocking=True)
                    pre[torch.tensor(idx, device=dev)] = self.preprocess(batch)
            out.append(self.features(pre).float().cpu())
        return torch.cat(out)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, size={self.spec.size}"


# ---------------------------------------------------------------------------------- open_clip load


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env and env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _reachable(url: str, timeout: float = HUB_CHECK_TIMEOUT) -> tuple[bool, str]:
    """Whether ``url`` answers within ``timeout`` seconds (DNS included; any HTTP status counts)."""
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append((True, ""))
        except urllib.error.HTTPError:
            result.append((True, ""))
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            result.append((False, f"{type(e).__name__}: {e}"))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return False, f"no answer within {timeout:g} s"
    return result[0]


def _resolve_open_clip_tag(model: str, tag: str) -> str:
    """Local file holding ``model``'s weights for ``tag``: from the cache, else a quick download."""
    open_clip = _import_open_clip()
    from open_clip import pretrained as ocp

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise EncoderError(
            f"{tag!r} is not a pretrained tag of open_clip model {model!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model) or 'none'})"
        )
    if cfg.get("file"):
        return cfg["file"]
    hf_hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    candidates: list[tuple[str, str]] = []
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        filename = filename or ocp.HF_WEIGHTS_NAME
        candidates = [(repo, f) for f in ocp._get_safe_alternatives(filename)] + [(repo, filename)]
    if candidates:
        from huggingface_hub import hf_hub_download

        for repo, filename in candidates:
            with contextlib.suppress(Exception):  # not cached
                return hf_hub_download(repo_id=repo, filename=filename, local_files_only=True)
    if url:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if cached.is_file():
            return str(cached)

    pp = ""
    tag_pp = (
        tuple(cfg.get("mean") or ocp.OPENAI_DATASET_MEAN),
        tuple(cfg.get("std") or ocp.OPENAI_DATASET_STD),
        cfg.get("resize_mode", "shortest"),
    )
    if tag_pp != (tuple(ocp.OPENAI_DATASET_MEAN), tuple(ocp.OPENAI_DATASET_STD), "shortest"):
        # a checkpoint file gets open_clip's defaults (OpenAI mean/std, shortest), not the tag's
        pp = (
            f" With a checkpoint file, give this tag's preprocessing: mean={tag_pp[0]}, std={tag_pp[1]}, "
            f"resize_mode={tag_pp[2]!r} (parse_encoder keyword arguments)."
        )
    base = f"cannot load open_clip weights {model}:{tag}: they are not in the local cache"
    hint = " " + _local_weights_hint(model, tag) + pp
    if _hub_offline():
        raise EncoderError(f"{base} and HF_HUB_OFFLINE is set (offline mode).{hint}")
    if candidates:
        from huggingface_hub import constants, hf_hub_download

        ok, why = _reachable(constants.ENDPOINT)
        if not ok:
            raise EncoderError(f"{base} and {constants.ENDPOINT} is unreachable ({why}).{hint}")
        errors = []
        for repo, filename in candidates:
            try:
                return hf_hub_download(repo_id=repo, filename=filename, etag_timeout=HUB_CHECK_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - reported below, with the hint
                errors.append(f"{filename}: {type(e).__name__}: {e}")
        where = f"{constants.ENDPOINT}/{candidates[0][0]}"
        raise EncoderError(f"{base} and downloading from {where} failed ({'; '.join(errors)}).{hint}")
    ok, why = _reachable(url)
    if not ok:
        raise EncoderError(f"{base} and {url} is unreachable ({why}).{hint}")
    try:
        return ocp.download_pretrained_from_url(url)
    except Exception as e:
        raise EncoderError(f"{base} and downloading {url} failed ({type(e).__name__}: {e}).{hint}") from e


def _register_open_clip_config(name: str, cfg: dict) -> str:
    """Name under which open_clip builds ``cfg``: ``name`` if it already knows exactly that config,
    else ``name`` (unknown to open_clip) or a derived name (different config), registered now."""
    open_clip = _import_open_clip()
    known = open_clip.get_model_config(name)
    if known == cfg:
        return name
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise EncoderError(f"open_clip model_config of {name!r} lacks {sorted(missing)}")
    reg = name
    if known is not None:
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        reg = f"{name}-ue-{digest}"
        if open_clip.get_model_config(reg) == cfg:
            return reg
    with tempfile.TemporaryDirectory(prefix="ue-open-clip-cfg-") as tmp:
        p = Path(tmp) / f"{reg}.json"
        p.write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(p)  # open_clip keeps the parsed config after the file is gone
    if open_clip.get_model_config(reg) != cfg:
        raise EncoderError(f"open_clip refused the model_config of {name!r}")
    return reg


def _load_open_clip(spec: EncoderSpec, device: torch.device) -> tuple[nn.Module, int | None]:
    open_clip = _import_open_clip()
    hint = _local_weights_hint(spec.name if not spec.name.startswith("local-dir:") else None, spec.weights)
    try:
        if spec.name.startswith("local-dir:"):
            d = spec.name[len("local-dir:") :]
            if not Path(d, "open_clip_config.json").is_file():
                raise EncoderError(f"open_clip bundle not found: {d!r} (no open_clip_config.json)")
            model = open_clip.create_model(spec.name, device=device, require_pretrained=True)
        else:
            if not spec.weights:
                raise EncoderError(
                    f"open_clip:{spec.name} has no weights: random initialisation is not allowed. {hint}"
                )
            cfg = (
                spec.model_config if spec.model_config is not None else open_clip.get_model_config(spec.name)
            )
            if cfg is None:
                raise EncoderError(f"unknown open_clip model {spec.name!r}; {_known_models_hint(open_clip)}")
            name = _register_open_clip_config(spec.name, cfg)
            if _is_path(spec.weights):
                ckpt = _abs_file(spec.weights, f"open_clip checkpoint for {spec.name}")
            else:
                ckpt = _resolve_open_clip_tag(spec.name, spec.weights)
            model = open_clip.create_model(name, pretrained=ckpt, device=device, require_pretrained=True)
    except EncoderError:
        raise
    except (RuntimeError, ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise EncoderError(f"cannot build open_clip encoder {spec}: {e}. {hint}") from e
    cfg = spec.model_config or {}
    dim = cfg.get("embed_dim")
    return model, int(dim) if isinstance(dim, int) else None


# -------------------------------------------------------------------------------- torchvision load


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise EncoderError(f"{type(model).__name__} has no nn.Linear head to replace")
    return last


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file...
        raise EncoderError(
            f"cannot read weights {path!r} as a plain state dict ({type(e).__name__}: {e}); save it with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"weights {path!r} are not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_torchvision(spec: EncoderSpec, device: torch.device) -> tuple[nn.Module, int]:
    import torchvision

    try:
        if spec.weights is None:
            warnings.warn(
                f"encoder torchvision:{spec.name} has no weights: it is a RANDOM network, so its clusters and "
                "perturbations are meaningless (fine for tests only). Give weights: "
                f"'torchvision:{spec.name}:/path/weights.pth' (made on a machine with internet by "
                f"`torch.save(torchvision.models.{spec.name}(weights='DEFAULT').state_dict(), 'weights.pth')`) "
                "or an open_clip encoder such as 'open_clip:RN50-quickgelu:/path/rn50-openai.pt'",
                RandomEncoderWarning,
                stacklevel=3,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = torchvision.models.get_model(spec.name, weights=None)
        else:
            model = torchvision.models.get_model(spec.name, weights=None)
    except ValueError as e:
        raise EncoderError(f"unknown torchvision model {spec.name!r}: {e}") from e
    head_name, head = _last_linear(model)
    dim = head.in_features
    _set_submodule(model, head_name, nn.Identity())
    if spec.weights is not None:
        path = _abs_file(spec.weights, f"torchvision weights for {spec.name}")
        sd = _load_weights_file(path)
        sd = {k: v for k, v in sd.items() if k not in (f"{head_name}.weight", f"{head_name}.bias")}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise EncoderError(f"weights {path!r} do not fit torchvision model {spec.name!r}: {e}") from e
    return model.to(device), dim


# ------------------------------------------------------------------------------------- public API


def load_encoder(spec: EncoderSpec | str, device: torch.device | str = "cpu") -> Encoder:
    """Build the encoder a spec names, frozen (eval mode, no grad on parameters) on ``device``.

    The returned ``encoder.spec`` has ``weights_digest`` filled in.

    Raises:
        EncoderError: bad spec, weights unreachable (offline: fails within seconds, with a hint on how
            to point at local weights), weights not matching the model, or weights whose digest differs
            from ``spec.weights_digest``.
    """
    if isinstance(spec, str):
        spec = parse_encoder(spec)
    if not isinstance(spec, EncoderSpec):
        raise EncoderError(f"load_encoder expects an EncoderSpec or a spec string, got {type(spec).__name__}")
    device = torch.device(device)
    if spec.kind == "open_clip":
        model, dim = _load_open_clip(spec, device)
        mode = "open_clip"
    elif spec.kind == "torchvision":
        model, dim = _load_torchvision(spec, device)
        mode = "module"
    else:
        raise EncoderError(
            f"callable encoder {spec.name!r} cannot be rebuilt from its spec; wrap the function again with "
            "callable_encoder(fn, ...) (its digest is checked against the protection's)"
        )
    _freeze(model)
    digest = _state_dict_digest(model)
    if spec.weights_digest is not None and spec.weights_digest != digest:
        raise EncoderError(
            f"encoder weights differ from the ones the protection was fitted with ({spec}: expected "
            f"{spec.weights_digest}, got {digest}); use the same weights file"
        )
    return Encoder(replace(spec, weights_digest=digest), model, mode, dim=dim)


def callable_encoder(
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    name: str | None = None,
    resize_mode: str = "shortest",
    interpolation: str = "bilinear",
) -> Encoder:
    """Wrap a callable taking preprocessed ``(B, 3, size, size)`` float and returning ``(B, D)``.

    An ``nn.Module`` is registered as a submodule (``.to(device)`` moves it), put in eval mode with
    its parameters frozen, and the spec's digest is over its state_dict; a plain function gets no
    digest. The spec has kind ``"callable"`` and cannot be rebuilt by `load_encoder`.
    """
    if not callable(fn):
        raise EncoderError(f"callable_encoder needs a callable, got {type(fn).__name__}")
    is_module = isinstance(fn, nn.Module)
    if name is None:
        name = type(fn).__name__ if is_module else getattr(fn, "__qualname__", None) or repr(fn)
    spec = EncoderSpec(
        kind="callable",
        name=name,
        weights=None,
        size=size,
        mean=tuple(mean),
        std=tuple(std),
        resize_mode=resize_mode,
        interpolation=interpolation,
    )
    if is_module:
        _freeze(fn)
        spec = replace(spec, weights_digest=_state_dict_digest(fn))
        return Encoder(spec, fn, "module")
    return Encoder(spec, None, "callable", fn=fn)
