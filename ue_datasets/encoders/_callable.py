"""The ``callable`` kind: wrap any callable as an encoder (`callable_encoder`); no spec string names it,
and `load_encoder` cannot rebuild one from its spec."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from .encoder import Encoder, FunctionFeatures, _freeze, _state_dict_digest
from .registry import Loaded, register_kind
from .spec import EncoderError, EncoderSpec


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
        return Encoder(spec, fn)
    return Encoder(spec, None, FunctionFeatures(fn))


def _load_callable(spec: EncoderSpec, device: torch.device) -> Loaded:
    """Refuses: a callable's code is not in its spec."""
    raise EncoderError(
        f"callable encoder {spec.name!r} cannot be rebuilt from its spec; wrap the function again with "
        "callable_encoder(fn, ...) (its digest is checked against the protection's)"
    )


register_kind("callable", parse=None, load=_load_callable)
