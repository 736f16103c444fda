"""A fit's cache folder and its per-round checkpoints (JSON and safetensors, written atomically, no pickle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..apply.commit import write_json
from ..errors import UEDatasetsError
from .store import CHECKPOINT

#: The file that marks a cache folder as made by a fit (only such a folder's contents are ever removed).
CACHE_MARK = ".ue-datasets-fit-cache"


def claim_cache(cache: Path) -> None:
    """Make ``cache`` this fit's: a new or empty folder, or one an earlier fit marked (`CACHE_MARK`).

    Raises:
        UEDatasetsError: ``cache`` holds files no fit made; nothing in it is touched.
    """
    if cache.exists() and (not cache.is_dir() or (any(cache.iterdir()) and not (cache / CACHE_MARK).exists())):
        raise UEDatasetsError(f"{cache}: exists and was not made by a ue-datasets fit; nothing in it is touched: "
                              "give a new or empty cache directory")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / CACHE_MARK).touch()


def remove_cache(cache: str | os.PathLike, method: str = "em", store: bool = True) -> None:
    """Remove what a fit wrote into ``cache`` (the ``method``'s checkpoint folder, and the sample store of
    EM and SALM when ``store``), only in a cache a fit marked as its own; the folder itself only if then
    empty."""
    cache = Path(cache)
    if not (cache / CACHE_MARK).exists():
        return
    for sub in ("store", method) if store else (method,):
        shutil.rmtree(cache / sub, ignore_errors=True)
    if not any(p.name != CACHE_MARK for p in cache.iterdir()):
        (cache / CACHE_MARK).unlink()
        cache.rmdir()


def read_checkpoint(directory: Path, settings: dict) -> dict | None:
    """The last completed round's checkpoint in ``directory`` (None when there is none).

    Raises:
        UEDatasetsError: the checkpoint is of a fit with other settings.
    """
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    found = json.loads(path.read_text())
    expected = json.loads(json.dumps(settings))
    different = sorted(k for k in set(expected) | set(found["settings"]) if found["settings"].get(k) != expected.get(k))
    if different:
        raise UEDatasetsError(f"{directory}: a checkpoint of a fit with other settings (differs in "
                              f"{', '.join(different)}); give another cache directory or delete this one")
    return found


def write_checkpoint(directory: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (safetensors, alternating between two files), then ``state`` (JSON, naming
    the tensors' file), each atomically: a kill at any point leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    name = f"weights-{state['round'] % 2}.safetensors"
    tmp = directory / (name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, directory / name)
    write_json(str(directory / CHECKPOINT), {**state, "weights": name})


def checkpoint_tensors(directory: Path, state: dict) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint names (read with safetensors, no pickle)."""
    from safetensors.torch import load_file

    return load_file(directory / state["weights"])
