"""Stage 1, fit: compute a protection from data or a key. Each function returns a `Protection`.

The package itself is callable, so that one call fits any method by its name: this is
``fit_convolution(10, 123456789)`` followed by ``protection.save("doc-protection")``

>>> import ue_datasets
>>> protection = ue_datasets.fit("cuda", num_classes=10, key=123456789, output="doc-protection")
>>> ue_datasets.load_protection("doc-protection").id == protection.id
True
"""

from __future__ import annotations

import os
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..artifact import Protection

__all__ = ["METHODS", "fit", "fit_clusters", "fit_convolution"]

#: Method names as the command line spells them (``ue-datasets fit NAME``), and their fit functions.
METHODS = {"cuda": "fit_convolution", "convolution": "fit_convolution", "clusters": "fit_clusters"}


def fit(method: str, *args: Any, output: str | os.PathLike | None = None, overwrite: bool = False,
        **options: Any) -> Protection:
    """Fit ``method`` (``"cuda"``, ``"clusters"``) with the options of its fit function; save it to ``output``.

    Args:
        method: a name of `METHODS`.
        *args, **options: the arguments of `fit_convolution` (``num_classes``, ``key``...) or
            `fit_clusters` (``src``, ``encoder``...).
        output: an artifact directory to write (optional); an existing non-empty one is refused
            unless ``overwrite`` and it holds an artifact.

    Returns:
        The fitted `Protection`.
    """
    from ..errors import UEDatasetsError

    if method not in METHODS:
        raise UEDatasetsError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    protection = getattr(sys.modules[__name__], METHODS[method])(*args, **options)
    if output is not None:
        protection.save(output, overwrite=overwrite)
    return protection


def __getattr__(name: str) -> Any:  # fit functions import torch; importing them waits for their first use
    if name == "fit_convolution":
        from .convolution import fit_convolution

        return fit_convolution
    if name == "fit_clusters":
        from .clusters import fit_clusters

        return fit_clusters
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``ue_datasets.fit`` is this package and also the `fit` function (``ue_datasets.fit("cuda", ...)``)."""

    def __call__(self, method: str, *args: Any, **options: Any) -> Protection:
        return fit(method, *args, **options)


sys.modules[__name__].__class__ = _CallableModule
