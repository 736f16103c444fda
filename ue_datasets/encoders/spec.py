"""`EncoderSpec` (what surrogate to build and how to preprocess for it), its constants and errors.

A spec is JSON-serialisable: a fitted protection records the one it was fitted with, and
`ue_datasets.encoders.load_encoder` rebuilds the encoder from it and checks the weights' digest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import UEDatasetsError

#: The built-in encoder kinds, in the order `registry.list_encoder_kinds` and error messages list them;
#: each registers itself (`registry.register_kind`), and a spec accepts any registered kind.
KINDS = ("open_clip", "torchvision", "callable", "packaged", "pixels")
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Preprocessing overrides given to `parse_encoder` (``size``, ``mean``, ``std``, ``resize_mode``,
#: ``interpolation``); a None value keeps the kind's default.
Overrides = Mapping[str, Any]


class EncoderError(UEDatasetsError):
    """An encoder spec is malformed, its weights cannot be reached, or they differ from the expected ones."""


class RandomEncoderWarning(UserWarning):
    """An encoder was built without weights: a random network, whose clusters mean nothing."""


def _floats3(v: Any, what: str) -> tuple[float, ...]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError as e:
        raise EncoderError(f"encoder {what} must be 3 numbers, got {v!r}") from e
    if len(t) != 3:
        raise EncoderError(f"encoder {what} must be 3 numbers, got {v!r}")
    return t


def _known_kinds() -> tuple[str, ...]:
    from .registry import list_encoder_kinds  # the registry imports this module

    return list_encoder_kinds()


@dataclass(frozen=True)
class EncoderSpec:
    """What encoder to build and how to preprocess its input; JSON round-trips.

    Attributes:
        kind: a registered kind: ``"open_clip"``, ``"torchvision"``, ``"callable"``, ``"packaged"`` or
            ``"pixels"``.
        name: open_clip model name (``"RN50"``) or ``"local-dir:/abs/path"``; torchvision model name
            (``"resnet50"``); packaged model name (``"efficientnet-lite0"``); ``"pixels"``; a display
            name for callables.
        weights: open_clip: pretrained tag (``"openai"``) or absolute checkpoint path (None for
            ``local-dir``); torchvision: absolute weights path, or None for a seeded random init
            (only meant for tests); packaged: absolute path of the weights file the package installed;
            pixels and callable: None.
        size: side of the square input the encoder sees.
        mean, std: 3 per-channel normalisation values, applied to pixels in [0, 1].
        resize_mode: ``"shortest"`` (shorter side to ``size``, then center crop) or ``"squash"``
            (resize to ``size`` x ``size``).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        weights_digest: ``sha256:<hex>`` over the model's state_dict (a fixed one for ``pixels``);
            `load_encoder` fills it and refuses weights that differ from a set one.
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
        kinds = _known_kinds()
        if self.kind not in kinds:
            raise EncoderError(f"encoder kind must be one of {kinds}, got {self.kind!r}")
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
        if self.name == self.kind:  # a weightless kind named after itself (``pixels:28``)
            return f"{self.kind}:{self.size}"
        w = f":{self.weights}" if self.weights else ""
        return f"{self.kind}:{self.name}{w}"


# ------------------------------------------------------------------------ helpers for the kinds' parsers


def _is_path(s: str) -> bool:
    """Whether a spec's weights part names a file (rather than a tag or an enum name)."""
    return os.path.isfile(s) or "/" in s or os.sep in s or s.lower().endswith(WEIGHT_SUFFIXES)


def _abs_file(s: str, what: str) -> str:
    """The resolved absolute path of the existing file ``s``; EncoderError naming ``what`` otherwise."""
    p = Path(s).expanduser()
    if not p.is_file():
        raise EncoderError(f"{what} not found: {str(p)!r} (no such file)")
    return str(p.resolve())


def _interp_name(v: Any) -> str:
    """``"bilinear"`` from ``"bilinear"``, ``"BILINEAR"`` or ``InterpolationMode.BILINEAR``."""
    s = str(v).lower()
    s = s.rsplit(".", 1)[-1]  # InterpolationMode.BILINEAR -> bilinear
    return s


def _finish(
    kind: str, name: str, weights: str | None, base: Mapping[str, Any], model_config: dict | None, over: Overrides
) -> EncoderSpec:
    """Merge preprocessing ``base`` (``size``, ``mean``, ``std``, ``resize_mode``, ``interpolation``)
    with the non-None overrides and build the spec."""
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
