"""Fit T2UE: train a text-to-noise generator against a frozen CLIP (a reconstruction; no official code).

Ma et al. 2025, "Generating Unlearnable Examples from Text Descriptions" (§3, §4) and the authors'
development code: the generator ``G(e, z)`` (`ue_datasets.fit.t2ue_generator`, SSA-GAN ``NetG``) turns a
frozen CLIP text embedding ``e`` and a latent ``z ~ N(0, I)`` into noise ``delta`` with ``|delta| <= eps``.
It is trained so that the frozen CLIP matches each protected image ``clamp(x + delta, 0, 1)`` with its
own caption, i.e. to minimise CLIP's symmetric InfoNCE: the noise becomes an easy, text-aligned shortcut.
Afterwards only text is needed to make noise (`ue_datasets.apply.generators.text_noise`).

Pairs (image, caption) stream from webdataset shards (``jpg``/``png`` + ``txt``), parquet files or a
``save_to_disk`` dataset, in source order, every epoch. Settings follow the paper and development code:
Adam with decoupled weight decay (AdamW), lr 1e-4, betas (0.0, 0.9), cosine schedule (to 0: the development
code's ``eta_min=0.001`` is above its lr), CLIP's logit scale. Three deviations, all said in the README:

- the tanh output is scaled by eps (``bound="scale"``), where the development code clamps it at +-eps
  (``bound="clamp"``), which leaves every saturated element without gradient;
- captions that repeat within a batch (class-name prompts) are all positives of each other (a
  multi-positive InfoNCE; the same loss as CLIP's when captions are unique);
- batch norm runs on batch statistics while training, on its running statistics when noise is made
  (``eval``), so that a sample's noise does not depend on the batch it comes in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..apply.core import resolve_device
from ..apply.encoded import batched, shared_pool
from ..apply.generators import PREFIX, build_generator
from ..apply.images import DEFAULT_MAX_PIXELS, decode_with_profile, image_tensor
from ..apply.records import Record, iter_records
from ..apply.texts import TEMPLATES, caption_text, check_template
from ..artifact import Protection
from ..errors import SampleError, UEDatasetsError
from ..kernels.noise import match_delta
from ..kernels.samples import colour_planes
from ..progress import progress_bar
from .budget import parse_eps
from .checkpoint import checkpoint_tensors, claim_cache, read_checkpoint, write_checkpoint
from .store import derive_seed
from .t2ue_generator import BOUNDS

#: Class-wise (one latent: noise is a function of the text) or sample-wise (a latent per sample key).
MODES = {"class": "text", "sample": "text-sample"}
#: CLIP's logit scale when the model does not carry one (its trained value is capped at 100).
DEFAULT_LOGIT_SCALE = 100.0
#: Adam's betas in the development code.
BETAS = (0.0, 0.9)


def generator_resolution(image_size: int) -> int:
    """The smallest power of two >= the CLIP's input side, within [8, 256] (224 -> 256, the paper's)."""
    return min(256, max(8, 1 << (int(image_size) - 1).bit_length()))


def t2ue_protection(generator: torch.nn.Module, clip: dict, *, eps: float, mode: str = "class", z_seed: int,
                    bound: str = "scale", templates: tuple[str, ...] = TEMPLATES,
                    info: dict[str, Any] | None = None) -> Protection:
    """The artifact of a trained generator: its weights (``generator.*``), the CLIP spec (JSON, weights
    digest filled in), the budget, the mode's lookup, the prompt templates and the latent seed (a tensor).

    Args:
        generator: a `T2UEGenerator` (its ``text_dim``, ``nz``, ``ngf``, ``resolution`` go into params).
        clip: ``EncoderSpec.to_json()`` of the CLIP whose text tower embeds the texts.
        eps: L-inf budget in [0, 1] pixel units.
        mode: one of `MODES`.
        z_seed: seed of the latents (``z0`` class-wise; each key's, sample-wise).
        bound: how the tanh output meets the budget (`BOUNDS`: ``scale`` by eps, or ``clamp``).
        templates: prompt templates with ``{name}`` (the first is the class-wise one).
        info: how it was fitted (epochs, losses...), kept in params.
    """
    if mode not in MODES:
        raise UEDatasetsError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if bound not in BOUNDS:
        raise UEDatasetsError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if not clip.get("weights_digest"):
        raise UEDatasetsError("the CLIP spec must carry its weights digest (load it once to fill it in)")
    templates = tuple(check_template(t) for t in templates)
    if not templates:
        raise UEDatasetsError("give at least one prompt template")
    g = generator
    params = {"lookup": MODES[mode], "eps": float(eps), "bound": bound, "resolution": g.resolution, "nz": g.nz,
              "ngf": g.ngf, "text_dim": g.text_dim, "generator": "ssa-gan-netg", "clip": clip,
              "templates": list(templates), **(info or {})}
    tensors = {PREFIX + k: v.detach().cpu().clone() for k, v in g.state_dict().items()}
    tensors["z_seed"] = torch.tensor([int(z_seed)], dtype=torch.int64)
    return Protection("t2ue", json.loads(json.dumps(params)), tensors)


def with_mode(protection: Protection, mode: str) -> Protection:
    """The same generator in another mode (class- or sample-wise), as a new protection with a new id."""
    if protection.method != "t2ue":
        raise UEDatasetsError(f"not a T2UE protection: {protection.method!r}")
    if mode not in MODES:
        raise UEDatasetsError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return Protection("t2ue", {**protection.params, "lookup": MODES[mode]}, dict(protection.tensors))


def _square(x: torch.Tensor, size: int, spec: Any) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> float ``(C, size, size)`` in [0, 1], resized as the CLIP's spec resizes."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = x.float().div_(255)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    interp, antialias = InterpolationMode(spec.interpolation), spec.interpolation != "nearest"
    if spec.resize_mode == "squash":
        x = TF.resize(x, [size, size], interpolation=interp, antialias=antialias)
    else:
        x = TF.center_crop(TF.resize(x, [size], interpolation=interp, antialias=antialias), [size, size])
    return x.clamp_(0, 1)


def _decode(record: Record, size: int, spec: Any, field: str, max_pixels: int) -> tuple[torch.Tensor, str]:
    try:
        image = record.image
        pixels = (decode_with_profile(bytes(image), max_pixels).pixels
                  if isinstance(image, (bytes, bytearray, memoryview)) else image_tensor(image))
        caption = caption_text(field, record.text)
    except UEDatasetsError as e:
        raise SampleError(record.source, record.key, str(e)) from None
    return _square(colour_planes(pixels), size, spec), caption


def caption_batches(src: str, caption_field: str, batch_size: int, size: int, spec: Any, *,
                    image_field: str | None = None, limit: int | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(image, caption) pairs of ``src`` in source order, as batches ``(x float (B, C, size, size) in
    [0, 1], captions)``, C = 1 or 3 (one batch holds one C); decoded in the shared thread pool.

    Raises:
        SampleError: an image that does not decode or a missing caption (names the file and the key).
    """
    records = iter_records(src, image_field=image_field, text_field=caption_field)
    if limit is not None:
        records = (r for i, r in zip(range(limit), records))
    pool = shared_pool()
    for group in batched(records, batch_size):
        decoded = list(pool.map(lambda r: _decode(r, size, spec, caption_field, max_pixels), group))
        by_c: dict[int, list[int]] = {}
        for i, (x, _) in enumerate(decoded):
            by_c.setdefault(x.shape[0], []).append(i)
        for idx in by_c.values():
            yield torch.stack([decoded[i][0] for i in idx]), [decoded[i][1] for i in idx]


def multi_positive_infonce(image: torch.Tensor, text: torch.Tensor, captions: list[str], scale: float) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised features ``(B, D)``; pairs with the same caption are all
    positives (equal weights), so it is CLIP's loss when captions are unique."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    y = torch.tensor([ids[c] for c in captions], device=image.device)
    same = (y[:, None] == y[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    logits = scale * image @ text.T
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def _adam_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, s in optimizer.state_dict()["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            out[f"optim.{i}.{name}"] = torch.as_tensor(s[name]).clone()
    return out


def _restore_adam(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = optimizer.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".")
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    optimizer.load_state_dict(sd)


def fit_t2ue(
    src: str,
    *,
    clip: str,
    caption_field: str = "txt",
    image_field: str | None = None,
    eps: float | str = 8 / 255,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    logit_scale: float | None = None,
    resolution: int | None = None,
    ngf: int | None = None,
    nz: int = 100,
    mode: str = "class",
    bound: str = "scale",
    templates: tuple[str, ...] = TEMPLATES,
    seed: int = 0,
    device: str = "auto",
    cache_dir: str | None = None,
    init: Protection | str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> Protection:
    """Train a T2UE generator on (image, caption) pairs against a frozen CLIP.

    Args:
        src: shards, parquet files or a ``save_to_disk`` dataset holding images and captions.
        clip: an open_clip spec (``open_clip:MODEL:/path/ckpt``, ``local-dir:/path``, a cached tag):
            its image tower scores protected images, its text tower embeds the captions.
        caption_field: the caption field (webdataset ``txt``) or column.
        eps: L-inf budget (``8/255``, the paper's).
        epochs: passes over ``src`` (paper: 500 on MSCOCO).
        batch_size: pairs per step (paper: 128).
        lr, weight_decay: AdamW's (betas (0.0, 0.9)); cosine decay to 0 over ``epochs``.
        logit_scale: InfoNCE's; default the CLIP's own ``logit_scale.exp()``, else 100.
        resolution: the generator's output side (a power of two); default `generator_resolution` of
            the CLIP's input size. Noise is resized to every image nearest.
        ngf, nz: generator width (default ``text_dim // 8``, at least 8, as the development code) and
            latent size (100).
        mode: the artifact's lookup (`MODES`): ``class`` (noise by text) or ``sample`` (by text and key).
        bound: ``scale`` (``eps * tanh``, the default: every element learns) or ``clamp`` (the development
            code's ``clamp(tanh, -eps, eps)``); see `T2UEGenerator.noise`.
        templates: prompt templates for class-name prompts at protect time (kept in the artifact).
        seed: the generator's initialisation, the training latents and ``z0``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...
        cache_dir: where a checkpoint is written after every epoch; a rerun with the same settings
            resumes from the last one. ``None``: no checkpoints.
        init: a T2UE protection (or its directory) whose generator to start from, trained against the
            same CLIP; its budget, bound, templates and latent seed are kept (``eps``, ``bound`` and
            ``templates`` are then ignored). ``epochs=0`` re-wraps it, say in the other mode.
        limit: read at most this many pairs per epoch.
        progress: show progress bars.

    Returns:
        A ``t2ue`` `Protection`; ``params["loss_history"]`` holds each epoch's mean loss.

    Raises:
        SampleError: a pair without a decodable image or a caption (names the file and the key).
        UEDatasetsError: bad settings, or a resumed cache made with other settings.
    """
    from ..artifact import as_protection
    from ..encoders import load_encoder
    from ..encoders.text import load_text_encoder

    eps = parse_eps(eps)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("nz", nz)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
            raise UEDatasetsError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} "
                                  f"integer, got {value!r}")
    if mode not in MODES:
        raise UEDatasetsError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if bound not in BOUNDS:
        raise UEDatasetsError(f"bound must be one of {BOUNDS}, got {bound!r}")
    dev = resolve_device(device)
    image_encoder = load_encoder(clip, dev)
    text_encoder = load_text_encoder(clip, dev)
    spec = text_encoder.spec
    if image_encoder.spec.weights_digest != spec.weights_digest:
        raise UEDatasetsError(f"{clip}: the image and text towers come from different weights")
    start = as_protection(init) if init is not None else None
    if start is not None and start.method != "t2ue":
        raise UEDatasetsError(f"init must be a T2UE protection, got {start.method!r}")
    if start is None and epochs == 0:
        raise UEDatasetsError("epochs=0 trains nothing: give init= (a T2UE artifact to re-wrap) or epochs >= 1")
    if start is not None:  # the generator keeps the budget, bound, templates and latent seed it was made with
        if start.params["clip"].get("weights_digest") != spec.weights_digest:
            raise UEDatasetsError(f"init was trained against another CLIP than {clip} (weights digests differ)")
        eps, bound, templates = start.params["eps"], start.params["bound"], tuple(start.params["templates"])
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        if start is not None:
            generator = build_generator(start.params)
            generator.load_state_dict({k[len(PREFIX):]: v for k, v in start.tensors.items() if k.startswith(PREFIX)})
        else:
            text_dim = text_encoder.dim
            generator = build_generator({"text_dim": text_dim, "nz": nz, "ngf": ngf or max(8, text_dim // 8),
                                         "resolution": resolution or generator_resolution(image_encoder.spec.size)})
    generator = generator.to(dev)
    if generator.text_dim != text_encoder.dim:
        raise UEDatasetsError(f"the generator takes {generator.text_dim}-d text embeddings, {clip} gives "
                              f"{text_encoder.dim}")
    scale = float(logit_scale) if logit_scale is not None else _clip_logit_scale(image_encoder.model)
    optimizer = torch.optim.AdamW(generator.parameters(), lr=lr, betas=BETAS, weight_decay=weight_decay)
    size = image_encoder.spec.size
    settings = {"method": "t2ue", "source": src, "caption_field": caption_field, "image_field": image_field,
                "eps": eps, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "logit_scale": scale, "resolution": generator.resolution, "ngf": generator.ngf, "nz": generator.nz,
                "bound": bound, "seed": seed, "limit": limit, "clip_digest": spec.weights_digest, "device": dev.type,
                "init": None if start is None else start.digest}
    state: dict[str, Any] = {"settings": settings, "round": 0, "loss_history": []}
    directory = None
    if cache_dir is not None:
        directory = Path(cache_dir)
        claim_cache(directory)
        (directory / "t2ue").mkdir(exist_ok=True)
        found = read_checkpoint(directory / "t2ue", settings)
        if found is not None:
            state = found
            tensors = checkpoint_tensors(directory / "t2ue", state)
            generator.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
            _restore_adam(optimizer, tensors)
    total = None
    for epoch in range(state["round"], epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        draws = torch.Generator().manual_seed(derive_seed(seed, "t2ue-z", epoch))
        generator.train()
        losses, seen = [], 0
        bar = progress_bar(total=total, desc=f"t2ue epoch {epoch + 1}/{epochs}", unit="img", disable=not progress)
        for x, captions in caption_batches(src, caption_field, batch_size, size, image_encoder.spec,
                                           image_field=image_field, limit=limit):
            x = x.to(dev)
            e = text_encoder.encode_cached(captions).to(dev)
            z = torch.randn(x.shape[0], generator.nz, generator=draws).to(dev)
            delta = generator.noise(e, z, eps, bound=bound)
            protected = (x + match_delta(delta, x.shape)).clamp(0, 1)
            loss = multi_positive_infonce(F.normalize(image_encoder(protected), dim=-1), F.normalize(e, dim=-1),
                                          captions, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item() * x.shape[0])
            seen += x.shape[0]
            bar.update(x.shape[0])
            bar.set_postfix(loss=f"{losses[-1] / x.shape[0]:.3f}", refresh=False)
        bar.close()
        if not seen:
            raise UEDatasetsError(f"{src}: no (image, caption) pairs to train on")
        total = seen
        state = {**state, "round": epoch + 1, "loss_history": [*state["loss_history"], sum(losses) / seen]}
        if directory is not None:
            tensors = {PREFIX + k: v for k, v in generator.state_dict().items()}
            write_checkpoint(directory / "t2ue", state, {**tensors, **_adam_state(optimizer)})
    info = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "logit_scale": scale,
            "loss_history": state["loss_history"], "trained_from": None if start is None else start.id}
    z_seed = derive_seed(seed, "t2ue-z0") if start is None else int(start.tensors["z_seed"].reshape(-1)[0])
    return t2ue_protection(generator.eval(), spec.to_json(), eps=eps, mode=mode, z_seed=z_seed, bound=bound,
                           templates=templates, info=info)


def _clip_logit_scale(model: torch.nn.Module) -> float:
    value = getattr(model, "logit_scale", None)
    return float(value.detach().exp()) if isinstance(value, torch.Tensor) else DEFAULT_LOGIT_SCALE
