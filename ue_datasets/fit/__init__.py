"""Stage 1, fit: compute a protection from data or a key. Each function returns a `Protection`."""

from .clusters import fit_clusters
from .convolution import fit_convolution

__all__ = ["fit_clusters", "fit_convolution"]
