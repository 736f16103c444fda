"""ue-datasets: make image datasets unlearnable, in the pipelines where data is published and consumed.

The flow has three stages: **fit** a protection (`ue_datasets.fit`), keep it as a **protection
artifact** (`Protection`, saved with `Protection.save` and read with `load_protection`), and **apply**
it through one tensor core (`protect_batch`) behind thin adapters: `ue_datasets.transforms` (torchvision
v2), `ue_datasets.apply.hf` (``datasets.map``), `ue_datasets.apply.wds` (webdataset),
`ue_datasets.apply.parquet`, `ue_datasets.apply.ray` (Ray Data, and the Ray engine), and
`ue_datasets.protect` and the ``ue-datasets`` CLI for whole datasets.

    >>> import ue_datasets
    >>> protection = ue_datasets.fit("cuda", num_classes=10, key=123456789)
    >>> protection.method
    'convolution'

Names are imported on first use, so that ``import ue_datasets`` (and ``ue-datasets --help``) stays fast.
"""

import importlib as _importlib
import os as _os
import sys as _sys
from typing import Any as _Any


def _serve_checkout_transforms() -> None:
    """Make ``ue_datasets.transforms`` importable when this package is imported from a source checkout.

    In a checkout, ``transforms/`` sits beside this folder and installs as ``ue_datasets.transforms``;
    Python run from the checkout's root imports this folder (not the installed package), where
    ``transforms`` is not. A finder for that one name serves the checkout's folder; nothing installs a
    top-level ``transforms``.
    """
    import importlib.abc
    import importlib.util

    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "transforms")
    if _os.path.isdir(_os.path.join(here, "transforms")) or not _os.path.isfile(_os.path.join(folder, "__init__.py")):
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):  # noqa: ANN001
            if name != __name__ + ".transforms":
                return None
            return importlib.util.spec_from_file_location(
                name, _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])

    _sys.meta_path.insert(0, _Finder())  # before an installed copy's finder: this checkout's own folder


_serve_checkout_transforms()

#: Public names and the modules that hold them, imported on first use (torch takes seconds to import).
_LAZY = {
    "ArtifactError": "errors", "OutputError": "errors", "SampleError": "errors", "SourceError": "errors",
    "UEDatasetsError": "errors",
    "Protection": "artifact", "load_protection": "artifact", "read_manifest": "artifact",
    "protect_batch": "apply.core",
    "protect": "apply.protect", "ProtectResult": "apply.protect", "TooManySkipped": "apply.protect",
    "fit_clusters": "fit", "fit_convolution": "fit", "fit_em": "fit", "fit_salm": "fit", "fit_t2ue": "fit",
    "fit_uge": "fit", "authorized_model": "fit.uge",
    "text_noise": "apply.generators",
    "RayEngine": "apply.ray", "ProtectBatches": "apply.ray",
}

from .version import __version__ as __version__  # noqa: E402

__all__ = sorted([*_LAZY, "__version__", "fit"])


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "fit":  # the `fit` subpackage, which is also callable: ue_datasets.fit("cuda", ...)
        return _importlib.import_module(".fit", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
