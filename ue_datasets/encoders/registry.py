"""The registry of encoder kinds: how a spec string is parsed and how a spec's encoder is built.

Each kind module registers itself on import (``register_kind`` at its end); the package's
``__init__`` imports every kind module once. `parse_encoder` and `load_encoder` only dispatch:

* ``parse_spec_name("open_clip:RN50:openai")`` -> ``("open_clip", "RN50:openai")``; the kind's (or
  prefix's) ``parse(rest, overrides)`` returns an `EncoderSpec`, loading no weights.
* ``load(spec, device)`` of ``spec.kind`` returns a `Loaded` (the feature module, its dimension, how
  features are computed from it, a fixed digest for weightless kinds); `load_encoder` freezes the module,
  digests it and checks the digest against ``spec.weights_digest``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from .encoder import Encoder, FeaturesFn, _freeze, _state_dict_digest
from .spec import KINDS, EncoderError, EncoderSpec, Overrides


class Loaded(NamedTuple):
    """What a kind's loader returns.

    Attributes:
        model: the feature network on the requested device (frozen and digested by `load_encoder`).
        dim: the feature dimension D, when known without a forward pass.
        features: how ``(B, 3, S, S)`` float32 preprocessed images become ``(B, D)`` features
            (`FeaturesFn`); None: ``model(x)``.
        digest: a fixed ``sha256:`` digest for an encoder without weights; None: the digest of
            ``model.state_dict()``.
    """

    model: nn.Module
    dim: int | None = None
    features: FeaturesFn | None = None
    digest: str | None = None


#: ``parse(rest, overrides) -> EncoderSpec``: ``rest`` is the spec string after ``"KIND:"`` ("" for a
#: bare ``KIND``); the overrides are `parse_encoder`'s keyword arguments.
ParseFn = Callable[[str, Overrides], EncoderSpec]
#: ``load(spec, device) -> Loaded``.
LoadFn = Callable[[EncoderSpec, torch.device], Loaded]


@dataclass(frozen=True)
class _Kind:
    name: str
    parse: ParseFn | None
    load: LoadFn
    usage: tuple[str, ...]
    bare: bool


_KINDS: dict[str, _Kind] = {}
#: spec-string prefix -> (parser, whether the prefix alone, without ':', is a spec)
_PREFIXES: dict[str, tuple[ParseFn, bool]] = {}


def register_kind(
    name: str,
    *,
    parse: ParseFn | None,
    load: LoadFn,
    prefixes: Mapping[str, ParseFn] | None = None,
    usage: Sequence[str] = (),
    bare: bool = False,
) -> None:
    """Register the encoder kind ``name`` (the ``EncoderSpec.kind`` it builds).

    Args:
        name: the kind, also the spec-string prefix ``name:...`` that ``parse`` handles.
        parse: turns the text after ``name:`` into an `EncoderSpec`; None: no spec string names this
            kind (``callable``: specs come from `callable_encoder`).
        load: builds the encoder's model from a spec of this kind (`LoadFn`).
        prefixes: other spec-string prefixes this kind parses (open_clip's ``local-dir:``).
        usage: spec forms listed in the "accepted encoder specs" of error messages.
        bare: whether ``name`` alone (no ``:``) is a spec, parsed with ``rest=""`` (``pixels``).

    Raises:
        EncoderError: ``name`` or one of ``prefixes`` is already registered.
    """
    extra = dict(prefixes or {})
    for p in (name, *extra):
        if p in _KINDS or p in _PREFIXES:
            raise EncoderError(f"encoder kind or spec prefix {p!r} is already registered")
    _KINDS[name] = _Kind(name, parse, load, tuple(usage), bare)
    if parse is not None:
        _PREFIXES[name] = (parse, bare)
    for p, fn in extra.items():
        _PREFIXES[p] = (fn, False)


def _ordered() -> list[_Kind]:
    """The registered kinds: the built-in ones in `KINDS` order (whatever the import order), then others
    in registration order."""
    rank = {k: i for i, k in enumerate(KINDS)}
    return sorted(_KINDS.values(), key=lambda k: rank.get(k.name, len(KINDS)))  # stable: ties keep order


def list_encoder_kinds() -> tuple[str, ...]:
    """The registered encoder kinds: ``("open_clip", "torchvision", "callable", "packaged", "pixels")``,
    then any registered later."""
    return tuple(k.name for k in _ordered())


def accepted_specs() -> str:
    """``"accepted encoder specs: ..."``: the spec forms of every kind, for error messages."""
    return "accepted encoder specs: " + ", ".join(u for k in _ordered() for u in k.usage)


def parse_spec_name(spec: str) -> tuple[str, str | None]:
    """Split a spec string at its first ``:``: ``(kind, rest)``; ``rest`` is None without a ``:``."""
    kind, sep, rest = spec.partition(":")
    return kind, (rest if sep else None)


def parse_encoder(
    spec: str,
    *,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_mode: str | None = None,
    interpolation: str | None = None,
) -> EncoderSpec:
    """Parse an encoder spec string (see the package docstring) into an `EncoderSpec`; loads no weights.

    Preprocessing defaults: open_clip from the tag's pretrained config, else the model config's
    ``preprocess_cfg``, else open_clip's (OpenAI mean/std, bicubic, shortest) with the model's image
    size; note that a checkpoint *file* carries no preprocessing, so give the tag's mean/std/resize_mode
    when they are not OpenAI's (e.g. SigLIP: 0.5/0.5, squash). ``local-dir``: the bundle's
    ``preprocess_cfg``. torchvision: 224, ImageNet mean/std, bilinear, shortest (the Unlearnable
    Clusters reference uses Resize 256 -> CenterCrop 224; "shortest" at 224 approximates it).
    packaged: the weights' own (efficientnet-lite0: 224, mean 127/255, std 128/255, bicubic, shortest).
    pixels: 28 (or ``pixels:SIZE``), mean/std 0.5, bilinear, squash.
    Keyword arguments, when not None, override the defaults.

    Raises:
        EncoderError: malformed spec, unknown model or tag, missing checkpoint file, missing optional
            dependency.
    """
    over = {
        "size": size,
        "mean": mean,
        "std": std,
        "resize_mode": resize_mode,
        "interpolation": interpolation,
    }
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderError(f"empty encoder spec {spec!r}; {accepted_specs()}")
    spec = spec.strip()
    kind, rest = parse_spec_name(spec)
    entry = _PREFIXES.get(kind)
    if entry is None or (rest is None and not entry[1]):
        raise EncoderError(f"bad encoder spec {spec!r}; {accepted_specs()}")
    return entry[0](rest or "", over)


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
    loaded = _KINDS[spec.kind].load(spec, device)  # EncoderSpec only holds registered kinds
    model = _freeze(loaded.model)
    digest = loaded.digest or _state_dict_digest(model)
    if spec.weights_digest is not None and spec.weights_digest != digest:
        raise EncoderError(
            f"encoder weights differ from the ones the protection was fitted with ({spec}: expected "
            f"{spec.weights_digest}, got {digest}); use the same weights file"
        )
    return Encoder(replace(spec, weights_digest=digest), model, loaded.features, dim=loaded.dim)
