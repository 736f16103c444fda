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
import tempfile
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..artifact import Protection

__all__ = ["METHODS", "fit", "fit_clusters", "fit_convolution", "fit_em", "fit_salm", "fit_t2ue", "fit_uge"]

#: Method names as the command line spells them (``ue-datasets fit NAME``), and their fit functions.
METHODS = {"cuda": "fit_convolution", "convolution": "fit_convolution", "clusters": "fit_clusters",
           "em": "fit_em", "salm": "fit_salm", "t2ue": "fit_t2ue", "uge": "fit_uge"}
#: The module of each fit function, imported at its first use (they import torch).
_MODULES = {"fit_convolution": "convolution", "fit_clusters": "clusters", "fit_em": "em", "fit_salm": "salm",
            "fit_t2ue": "t2ue", "fit_uge": "uge"}


def fit(method: str, *args: Any, output: str | os.PathLike | None = None, overwrite: bool = False,
        **options: Any) -> Protection:
    """Fit ``method`` (``"cuda"``, ``"clusters"``, ``"em"``, ``"salm"``, ``"t2ue"``, ``"uge"``) with the options of
    its fit function; save it to ``output``.

    Args:
        method: a name of `METHODS`.
        *args, **options: the arguments of `fit_convolution` (``num_classes``, ``key``...),
            `fit_clusters` (``src``, ``encoder``...), `fit_em` or `fit_salm` (``src``, ``mode``...),
            `fit_t2ue` (``src``, ``clip``...), `fit_uge` (``src``, ``authorized_seed``...).
        output: an artifact directory to write (optional); an existing non-empty one is refused
            unless ``overwrite`` and it holds an artifact.

    Returns:
        The fitted `Protection`.
    """
    from ..errors import UEDatasetsError

    if method not in METHODS:
        raise UEDatasetsError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    function = getattr(sys.modules[__name__], METHODS[method])
    if output is None:
        return function(*args, **options)
    from pathlib import Path

    from ..artifact import ArtifactError, load_protection

    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:  # refused now, not after a long fit
        raise ArtifactError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    if method not in ("em", "salm") or options.get("bank_dir") is not None:
        protection = function(*args, **options)
        protection.save(output, overwrite=overwrite)
        return protection
    options.pop("bank_dir", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sample-wise noise bank is written beside the output, linked into it, and this copy removed.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.bank-", dir=out.parent) as scratch:
        function(*args, bank_dir=Path(scratch) / "bank", **options).save(out, overwrite=overwrite)
    return load_protection(out)


def __getattr__(name: str) -> Any:  # fit functions import torch; importing them waits for their first use
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``ue_datasets.fit`` is this package and also the `fit` function (``ue_datasets.fit("cuda", ...)``)."""

    def __call__(self, method: str, *args: Any, **options: Any) -> Protection:
        return fit(method, *args, **options)


sys.modules[__name__].__class__ = _CallableModule
