"""Stage 3, apply: the tensor core (`protect_batch`) and the adapters built on it."""

from .core import identity_protection, protect_batch, resolve_device

__all__ = ["identity_protection", "protect_batch", "resolve_device"]
