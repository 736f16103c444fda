"""The ``open_clip`` kind: open_clip image towers from a pretrained tag, a checkpoint file or a bundle.

Spec strings: ``open_clip:MODEL:TAG`` (weights from the local Hugging Face cache, downloaded only
when the Hub answers within `HUB_CHECK_TIMEOUT`), ``open_clip:MODEL:/path/checkpoint.{pt,bin,safetensors}``
and ``local-dir:/path`` (also ``open_clip:local-dir:/path``: an open_clip bundle directory).
Features: ``model.encode_image(x, normalize=False)``, ``(B, embed_dim)`` float32; the digest is over
the open_clip model's own state_dict (image and text towers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub import HUB_CHECK_TIMEOUT, _hub_offline, _reachable
from .registry import Loaded, accepted_specs, register_kind
from .spec import EncoderError, EncoderSpec, Overrides, _abs_file, _finish, _is_path


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EncoderError("open_clip encoders need open_clip_torch: pip install open_clip_torch") from e
    return open_clip


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


def _square_size(v: Any, where: str) -> int:
    """The side of a square image size given as an int or ``[side, side]``."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or int(v[0]) != int(v[1]):
            raise EncoderError(f"{where}: only square inputs are supported, got image size {v!r}")
        v = v[0]
    return int(v)


def _known_models_hint(open_clip: Any) -> str:
    names = open_clip.list_models()
    common = [
        n for n in ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu") if n in names
    ]
    return f"known models include {', '.join(common)} ({len(names)} in all: open_clip.list_models())"


def _parse_local_dir(path: str, over: Overrides) -> EncoderSpec:
    """``local-dir:PATH``: an open_clip bundle (open_clip_config.json + weights); its preprocess_cfg."""
    _import_open_clip()
    if not path:
        raise EncoderError("empty path after 'local-dir:'; " + accepted_specs())
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


def _parse_open_clip(rest: str, over: Overrides) -> EncoderSpec:
    """``open_clip:MODEL:TAG``, ``open_clip:MODEL:/path/checkpoint`` or ``open_clip:local-dir:PATH``."""
    if rest.startswith("local-dir:"):
        return _parse_local_dir(rest[len("local-dir:") :], over)
    open_clip = _import_open_clip()
    name, _, weights = rest.partition(":")
    if not name:
        raise EncoderError("missing open_clip model name in 'open_clip:'; " + accepted_specs())
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


def _load_open_clip(spec: EncoderSpec, device: torch.device) -> Loaded:
    """The open_clip model the spec names on ``device``, its ``embed_dim`` and `_image_features`."""
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
    return Loaded(model, int(dim) if isinstance(dim, int) else None, _image_features)


def _image_features(model: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed ``(B, 3, S, S)`` float32 -> ``(B, embed_dim)`` image features, not L2-normalised."""
    return model.encode_image(x, normalize=False)


register_kind(
    "open_clip",
    parse=_parse_open_clip,
    load=_load_open_clip,
    prefixes={"local-dir": _parse_local_dir},
    usage=(
        "'open_clip:MODEL:TAG' (e.g. open_clip:RN50:openai)",
        "'open_clip:MODEL:/path/to/checkpoint.pt'",
        "'local-dir:/path/to/open_clip_bundle'",
    ),
)
