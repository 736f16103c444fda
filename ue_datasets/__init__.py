"""ue-datasets: make image datasets unlearnable, in the pipelines where data is published and consumed.

The flow has three stages: **fit** a protection (`ue_datasets.fit`), keep it as a **protection
artifact** (`Protection`, saved with `Protection.save` and read with `load_protection`), and **apply**
it through one tensor core (`protect_batch`) behind thin adapters: `ue_datasets.transforms` (torchvision
v2), `ue_datasets.hf` (``datasets.map``), `ue_datasets.wds` (webdataset) and the ``ue-datasets`` CLI.
"""

from .apply.core import protect_batch
from .artifact import Protection, load_protection, read_manifest
from .errors import ArtifactError, SampleError, SourceError, UEDatasetsError
from .fit import fit_clusters, fit_convolution
from .version import __version__

__all__ = [
    "ArtifactError",
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
