"""`Encoder`: a frozen surrogate, preprocessing plus a feature extractor, and the digest of its weights."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .spec import EncoderError, EncoderSpec

#: How an encoder computes features from its model: ``features(model, x_pre)`` with ``x_pre`` the
#: preprocessed ``(B, 3, S, S)`` float32 batch, returning ``(B, D)``. A plain function rather than a
#: closure over the model, so that ``copy.deepcopy`` and ``.to(device)`` of the Encoder keep working.
FeaturesFn = Callable[[nn.Module | None, torch.Tensor], torch.Tensor]


def call_module(model: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """The default `FeaturesFn`: ``model(x)``."""
    return model(x)


class FunctionFeatures:
    """A `FeaturesFn` for a plain function of the preprocessed batch (no model): ``fn(x)``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, model: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


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
    """Put ``module`` in eval mode with no parameter requiring grad; returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer); CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class Encoder(nn.Module):
    """A frozen surrogate: preprocessing plus a feature extractor, always in eval mode.

    ``train()`` is ignored (batch-norm statistics of a surrogate must not change); parameters do not
    require grad, but `forward` is differentiable w.r.t. a float input.

    Args:
        spec: what the encoder is; ``spec.mean``/``spec.std``/``spec.size`` drive `preprocess`.
        model: the feature network, registered as the submodule ``model`` (None for a plain function).
        features: how features are computed from ``model`` (`FeaturesFn`); default ``model(x)``.
            Required when ``model`` is None.
        dim: the feature dimension D when known (else measured on first use of `dim`).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module | None,
        features: FeaturesFn | None = None,
        dim: int | None = None,
    ):
        super().__init__()
        if model is None and features is None:
            raise EncoderError("an Encoder needs a model or a features function")
        self.spec = spec
        self.model = model
        self._features = features if features is not None else call_module
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
        z = self._features(self.model, x_pre)
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
