"""ue-datasets: make image datasets unlearnable, in the pipelines where data is published and consumed.

The flow has three stages: **fit** a protection (`ue_datasets.fit`), keep it as a **protection
artifact** (`Protection`, saved with `Protection.save` and read with `load_protection`), and **apply**
it through one tensor core (`protect_batch`) behind thin adapters: `ue_datasets.transforms` (torchvision
v2), `ue_datasets.hf` (``datasets.map``), `ue_datasets.wds` (webdataset) and the ``ue-datasets`` CLI.
"""

import os as _os
import sys as _sys


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

    _sys.meta_path.append(_Finder())


_serve_checkout_transforms()

from .apply.core import protect_batch  # noqa: E402
from .artifact import Protection, load_protection, read_manifest  # noqa: E402
from .errors import ArtifactError, OutputError, SampleError, SourceError, UEDatasetsError  # noqa: E402
from .fit import fit_clusters, fit_convolution  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "ArtifactError",
    "OutputError",
    "Protection",
    "SampleError",
    "SourceError",
    "UEDatasetsError",
    "__version__",
    "fit_clusters",
    "fit_convolution",
    "load_protection",
    "protect_batch",
    "read_manifest",
]
