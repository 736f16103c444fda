"""Lookups whose deltas come from a generator the artifact holds: T2UE's text-to-noise.

``text`` (class-wise) gives every sample with the same text the same noise, ``G(e(text), z0)`` with one
fixed latent ``z0``; ``text-sample`` (sample-wise) also draws the latent from the sample's key, so two
samples with one caption get different noise. Both are functions of the text, the key, the artifact
and the device alone (float32 throughout, whatever autocast or TF32 the caller set): no image is read.

The generator is rebuilt from the artifact (its weights under ``generator.*``, its shape in params),
the text encoder from the CLIP spec in params (its weights digest checked), once per process and
device; class-wise deltas are cached per distinct text up to `CACHE_BYTES`. Texts and latents go
through the networks in fixed-size chunks (padded), so a sample's noise has the same bytes whatever
batch it comes in.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifact import Protection
from ..errors import UEDatasetsError
from .noise import lookup_of, register_lookup

#: Texts per forward pass of the text encoder and the generator (padded to it: same shapes, same bytes).
CHUNK = 32
#: Bytes of deltas kept per process (least recently used first out).
CACHE_BYTES = 256 * 2**20
#: The prefix of the generator's tensors in the artifact.
PREFIX = "generator."

_LOCK = threading.RLock()
_NETS: dict[tuple, object] = {}
_DELTAS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHED = [0]


def build_generator(params: dict) -> torch.nn.Module:
    """An untrained generator of the shape ``params`` records (``text_dim``, ``nz``, ``ngf``, ``resolution``)."""
    from ..fit.t2ue_generator import T2UEGenerator

    return T2UEGenerator(params["text_dim"], params["nz"], params["ngf"], params["resolution"])


def _generator(protection: Protection, device: torch.device) -> torch.nn.Module:
    key = ("generator", protection.digest, device)
    with _LOCK:
        if key not in _NETS:
            net = build_generator(protection.params)
            state = {k[len(PREFIX):]: v for k, v in protection.tensors.items() if k.startswith(PREFIX)}
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise UEDatasetsError(f"the artifact's generator does not fit its recorded shape: {e}") from None
            _NETS[key] = net.to(device).eval().requires_grad_(False)
        return _NETS[key]


def _text_encoder(protection: Protection, device: torch.device):
    from ..encoders import EncoderSpec
    from ..encoders.text import load_text_encoder

    spec = EncoderSpec.from_json(protection.params["clip"])
    key = ("text", str(spec.to_json()), device)
    with _LOCK:
        if key not in _NETS:
            _NETS[key] = load_text_encoder(spec, device)
        return _NETS[key]


def key_latent(seed: int, key: str | None, nz: int) -> torch.Tensor:
    """The latent ``(nz,)`` of a sample: ``N(0, I)`` drawn from ``seed`` (``key`` None) or from
    ``blake2b(key, seed)``; drawn on the CPU, so the same on any device."""
    if key is not None:
        seed = int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8, key=seed.to_bytes(8, "big")).digest(),
                              "big")
    return torch.randn(1, nz, generator=torch.Generator().manual_seed(seed))[0]


def _pad(rows: list, filler: object) -> list:
    return rows + [filler] * (-len(rows) % CHUNK)


@contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """Plain float32 arithmetic whatever the caller set: no autocast, no TF32, no cuDNN autotuning (each
    would change the noise's bits with the caller's settings)."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = saved


def _compute(protection: Protection, texts: list[str], keys: list[str | None], device: torch.device) -> torch.Tensor:
    """Deltas ``(N, 3, R, R)`` float32 on ``device`` for distinct (text, key) pairs, chunk by chunk."""
    params = protection.params
    encoder, net = _text_encoder(protection, device), _generator(protection, device)
    seed = int(protection.tensors["z_seed"].reshape(-1)[0])
    out = []
    with _LOCK, _float32(device), torch.inference_mode():  # the lock: the flags are process-wide
        for i in range(0, len(texts), CHUNK):
            part = _pad(texts[i : i + CHUNK], "")
            z = torch.stack(_pad([key_latent(seed, k, params["nz"]) for k in keys[i : i + CHUNK]],
                                 torch.zeros(params["nz"]))).to(device)
            e = encoder(encoder.tokenize(part)).float()
            out.append(net.noise(e, z, params["eps"], bound=params["bound"])[: len(texts[i : i + CHUNK])].clone())
    return torch.cat(out)


def is_sample_wise(protection: Protection) -> bool:
    """Whether a text protection's noise also depends on the sample's key (its lookup needs keys)."""
    return "keys" in lookup_of(protection).needs


def text_noise(protection: Protection, texts: Sequence[str], keys: Sequence[str] | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise of each text: float32 ``(N, 3, R, R)`` in [-eps, eps], R the generator's resolution.

    Args:
        protection: a T2UE protection (``params["lookup"]`` ``text`` or ``text-sample``).
        texts: one caption or prompt per sample.
        keys: one sample key per text; needed by a sample-wise protection, ignored by a class-wise one.
        device: where the networks run; the bytes are the same for any batch on one device.
    """
    if "texts" not in lookup_of(protection).needs:
        raise UEDatasetsError(f"this {protection.method!r} protection does not make noise from text")
    sample_wise = is_sample_wise(protection)
    texts = [str(t) for t in texts]
    if sample_wise and (keys is None or len(keys) != len(texts)):
        raise UEDatasetsError("a sample-wise text protection draws each sample's latent from its key: "
                              f"pass one key per text ({0 if keys is None else len(keys)} for {len(texts)})")
    device = torch.device(device)
    if not texts:
        r = protection.params["resolution"]
        return torch.zeros(0, 3, r, r, device=device)
    if sample_wise:  # every key is its own latent: nothing to reuse
        pairs = list(dict.fromkeys(zip(texts, (str(k) for k in keys))))
        fresh = dict(zip(pairs, _compute(protection, [t for t, _ in pairs], [k for _, k in pairs], device)))
        return torch.stack([fresh[p] for p in zip(texts, (str(k) for k in keys))])
    with _LOCK:
        missing = [t for t in dict.fromkeys(texts) if (protection.digest, device, t) not in _DELTAS]
    if missing:
        fresh = _compute(protection, missing, [None] * len(missing), device)
        with _LOCK:
            for t, d in zip(missing, fresh):
                _remember((protection.digest, device, t), d)
    with _LOCK:
        found = {t: _DELTAS.get((protection.digest, device, t)) for t in dict.fromkeys(texts)}
    if any(d is None for d in found.values()):  # evicted by a batch larger than the cache
        found = dict(zip(found, _compute(protection, list(found), [None] * len(found), device)))
    return torch.stack([found[t] for t in texts])


def noise_image(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Noise ``(3, H, W)`` in [-eps, eps] as uint8 grey levels: -eps 0, 0 128 (127.5 rounded half up), +eps 255."""
    return ((delta / eps + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)


def noise_file(protection: Protection | str | os.PathLike, text: str, output: str | os.PathLike, *,
               key: str | None = None, size: int | None = None, device: torch.device | str = "cpu",
               overwrite: bool = False) -> Path:
    """Write the noise of ``text`` (resized nearest to ``size``): ``.png`` as `noise_image`, ``.safetensors``
    exactly (float32 ``(3, size, size)`` named ``noise``). An existing file is replaced only with ``overwrite``.
    """
    from ..artifact import as_protection
    from .images import encode_png

    protection = as_protection(protection)
    out = Path(output)
    if out.suffix.lower() not in (".png", ".safetensors"):
        raise UEDatasetsError(f"{out}: write the noise to a .png (to look at) or a .safetensors file (exact)")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UEDatasetsError(f"{out}: exists; pass --overwrite to replace it")
    if "texts" not in lookup_of(protection).needs:
        raise UEDatasetsError(f"this {protection.method!r} protection does not make noise from text")
    if is_sample_wise(protection) and key is None:
        raise UEDatasetsError("this protection is sample-wise: its noise depends on the sample's key too; give it "
                              "(--key KEY)")
    if key is not None and not is_sample_wise(protection):
        raise UEDatasetsError("this protection is class-wise: its noise depends on the text alone; drop --key")
    delta = text_noise(protection, [text], None if key is None else [key], device)[0].cpu()
    if size is not None:
        delta = F.interpolate(delta[None], size=(size, size), mode="nearest")[0]
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        if out.suffix.lower() == ".png":
            tmp.write_bytes(encode_png(noise_image(delta, protection.params["eps"])))
        else:
            from safetensors.torch import save_file

            save_file({"noise": delta.contiguous()}, str(tmp))
        if overwrite:
            os.replace(tmp, out)
        else:  # a link fails if OUTPUT appeared meanwhile: never replaces a file unasked
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise UEDatasetsError(f"{out}: exists; pass --overwrite to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _remember(key: tuple, delta: torch.Tensor) -> None:
    if key in _DELTAS:
        _DELTAS.move_to_end(key)
        return
    _DELTAS[key] = delta
    _CACHED[0] += delta.numel() * delta.element_size()
    while _CACHED[0] > CACHE_BYTES and len(_DELTAS) > 1:
        _, old = _DELTAS.popitem(last=False)
        _CACHED[0] -= old.numel() * old.element_size()


@register_lookup("text", needs={"texts"})
def delta_by_text(protection: Protection, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """``G(e(text), z0)``: float32 ``(B, 3, R, R)`` in [-eps, eps] (T2UE class-wise)."""
    return text_noise(protection, texts, device=x.device)


@register_lookup("text-sample", needs={"texts", "keys"})
def delta_by_text_and_key(protection: Protection, x: torch.Tensor, texts: Sequence[str],
                          keys: Sequence[str]) -> torch.Tensor:
    """``G(e(text), z(key))``: float32 ``(B, 3, R, R)`` in [-eps, eps] (T2UE sample-wise)."""
    return text_noise(protection, texts, keys, device=x.device)
