"""Frozen text encoders: the text tower of an open_clip CLIP, for text-driven methods (T2UE).

A text encoder is named by the same spec strings as an open_clip image encoder (``open_clip:MODEL:TAG``,
``open_clip:MODEL:/path/checkpoint``, ``local-dir:/path``) and loads the whole CLIP model exactly as
`ue_datasets.encoders.load_encoder` does (same weights file, same digest over the same state_dict), so
an artifact can record one `EncoderSpec` and one digest for the CLIP it was built against.

Tokenizers are offline only: ``open_clip.get_tokenizer`` for the model (the SimpleTokenizer with the
config's ``context_length`` for most CLIPs); a Hugging Face tokenizer must already be in the local cache
(or in the ``local-dir`` bundle), and SigLIP's tokenizers, which fetch their vocabulary, are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ._open_clip import _import_open_clip, _load_open_clip, _register_open_clip_config
from .encoder import _freeze, _module_device, _state_dict_digest
from .registry import parse_encoder, parse_spec_name
from .spec import EncoderError, EncoderSpec

#: Distinct texts whose features `TextEncoder.encode_cached` keeps (a caption set as large as MSCOCO's would
#: otherwise hold all of them: 600,000 x 512 floats, 1.2 GB).
CACHE_SIZE = 65536
#: Spec-string prefixes that name open_clip models (the only text encoders).
_TEXT_PREFIXES = ("open_clip", "local-dir")


def _refuse_kind(kind: str) -> EncoderError:
    return EncoderError(
        f"text encoders are open_clip models; got kind {kind!r} (use 'open_clip:MODEL:TAG', "
        "'open_clip:MODEL:/path/to/checkpoint.pt' or 'local-dir:/path/to/open_clip_bundle')"
    )


def _text_cfg(spec: EncoderSpec) -> dict:
    cfg = spec.model_config
    if cfg is None and not spec.name.startswith("local-dir:"):
        cfg = _import_open_clip().get_model_config(spec.name)
    return dict((cfg or {}).get("text_cfg") or {})


def _get_tokenizer(spec: EncoderSpec) -> Any:
    """The open_clip tokenizer of ``spec``'s model, built without network access."""
    open_clip = _import_open_clip()
    text_cfg = _text_cfg(spec)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if spec.name.startswith("local-dir:"):
        name, kwargs = spec.name, {}  # open_clip reads the bundle's config (an HF tokenizer: from the bundle)
    else:
        cfg = spec.model_config if spec.model_config is not None else open_clip.get_model_config(spec.name)
        # the name open_clip knows this config under (registered when the model was loaded)
        name = _register_open_clip_config(spec.name, cfg) if cfg is not None else spec.name
        if "siglip" in name.lower() and not hf_name:
            raise EncoderError(
                f"the tokenizer of open_clip model {spec.name!r} (SigLIP) downloads its vocabulary: "
                "it needs network access, and text encoders only load offline"
            )
        kwargs = {"local_files_only": True} if hf_name else {}
    try:
        return open_clip.get_tokenizer(name, **kwargs)
    except ImportError as e:
        raise EncoderError(f"the tokenizer of {spec} needs a missing package ({e}); pip install transformers") from e
    except Exception as e:  # noqa: BLE001 - HF tokenizers raise many kinds of errors when not cached
        where = "the Hugging Face Hub" if hf_name and not spec.name.startswith("local-dir:") else "its files"
        raise EncoderError(
            f"cannot build the tokenizer of {spec} offline ({type(e).__name__}: {e}); "
            f"{f'the Hugging Face tokenizer {hf_name!r} ' if hf_name else 'it '}needs {where}, which is "
            "not in the local cache (text encoders never download)"
        ) from e


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise EncoderError(f"{what} expects a sequence of strings, got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise EncoderError(f"{what} expects strings, got {type(texts[bad]).__name__} at index {bad}")
    return list(texts)


class TextEncoder(nn.Module):
    """A frozen open_clip CLIP used for its text tower: tokenize, then ``model.encode_text``.

    ``train()`` is ignored; parameters do not require grad. The whole CLIP is kept (its state_dict is
    what ``spec.weights_digest`` covers), but only ``encode_text`` runs.

    Args:
        spec: the open_clip spec, ``weights_digest`` filled in.
        model: the open_clip CLIP model (frozen).
        tokenizer: ``tokenizer(list_of_str) -> (B, context_length)`` token ids.
        dim: the text feature dimension (``embed_dim``) when known.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, tokenizer: Any, dim: int | None = None,
                 cache_size: int = CACHE_SIZE):
        super().__init__()
        self.spec = spec
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self._dim = dim
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Ignored: the encoder always stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device the encoder computes on."""
        return _module_device(self.model)

    @property
    def context_length(self) -> int:
        """Tokens per text (`tokenize`'s second dimension)."""
        return int(getattr(self.tokenizer, "context_length", None) or self.tokenize([""]).shape[1])

    @property
    def dim(self) -> int:
        """Text feature dimension D."""
        if self._dim is None:
            self._dim = int(self._encode([""], 1).shape[1])
        return self._dim

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, context_length)`` int64 token ids on CPU (truncated/padded as open_clip does)."""
        texts = _check_texts(texts, "tokenize")
        if not texts:
            return torch.zeros(0, int(getattr(self.tokenizer, "context_length", 0) or 0), dtype=torch.long)
        return torch.as_tensor(self.tokenizer(texts)).long()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, context_length)`` token ids -> ``(B, D)`` float32 text features, not L2-normalised."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            raise EncoderError(f"text encoder input must be (B, L) token ids, got {getattr(tokens, 'shape', tokens)}")
        z = self.model.encode_text(tokens.to(self.device), normalize=False)
        return z.float()

    def encode(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        """Embed texts without gradients, batch by batch on the encoder's device.

        Returns:
            ``(N, D)`` float32 on CPU, in input order (an ordinary tensor, not an inference tensor);
            L2-normalised rows when ``normalize``.
        """
        z = self._encode(_check_texts(texts, "encode"), batch_size).clone()
        return nn.functional.normalize(z, dim=-1) if normalize else z

    @torch.inference_mode()
    def _encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise EncoderError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        out = [self(self.tokenize(texts[i : i + batch_size])).cpu() for i in range(0, len(texts), batch_size)]
        z = torch.cat(out)
        if self._dim is None:
            self._dim = int(z.shape[1])
        return z

    def encode_cached(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False) -> torch.Tensor:
        """Like `encode`, but each distinct text is encoded once: within the call, and across calls on
        this encoder (its weights are frozen) for the last ``cache_size`` distinct texts (`CACHE_SIZE`,
        about 130 MB of 512-d features); `clear_cache` forgets the stored features."""
        texts = _check_texts(texts, "encode_cached")
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        new = [t for t in dict.fromkeys(texts) if t not in found]
        if new:
            fresh = dict(zip(new, self.encode(new, batch_size=batch_size)))
            found.update(fresh)
            self._cache.update(fresh)
            while len(self._cache) > self.cache_size:  # the oldest first: a caption set larger than the cache
                del self._cache[next(iter(self._cache))]
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        z = torch.stack([found[t] for t in texts])
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def clear_cache(self) -> None:
        """Forget the features `encode_cached` stored."""
        self._cache.clear()

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


def load_text_encoder(spec: EncoderSpec | str, device: torch.device | str = "cpu") -> TextEncoder:
    """Build the frozen text encoder of the open_clip CLIP a spec names, on ``device``.

    The CLIP is loaded exactly as `ue_datasets.encoders.load_encoder` loads it, so
    ``load_text_encoder(s).spec.weights_digest == load_encoder(s).spec.weights_digest``.

    Raises:
        EncoderError: not an open_clip spec, weights unreachable offline, weights whose digest differs
            from ``spec.weights_digest``, or a tokenizer that would need the network.
    """
    if isinstance(spec, str):
        kind, _ = parse_spec_name(spec.strip())
        if kind not in _TEXT_PREFIXES:
            raise _refuse_kind(kind)
        spec = parse_encoder(spec)
    if not isinstance(spec, EncoderSpec):
        raise EncoderError(f"load_text_encoder expects an EncoderSpec or a spec string, got {type(spec).__name__}")
    if spec.kind != "open_clip":
        raise _refuse_kind(spec.kind)
    loaded = _load_open_clip(spec, torch.device(device))
    model = _freeze(loaded.model)
    digest = _state_dict_digest(model)
    if spec.weights_digest is not None and spec.weights_digest != digest:
        raise EncoderError(
            f"text encoder weights differ from the expected ones ({spec}: expected {spec.weights_digest}, "
            f"got {digest}); use the same weights file"
        )
    return TextEncoder(replace(spec, weights_digest=digest), model, _get_tokenizer(spec), dim=loaded.dim)
