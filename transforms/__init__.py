"""torchvision v2 transforms of ue-datasets, installed as ``ue_datasets.transforms``.

(The folder sits at the top of the repository; nothing installs a top-level ``transforms`` module.)
"""

from .protect import Protect, ProtectBatch, ProtectedDataset, default_labels_getter

__all__ = ["Protect", "ProtectBatch", "ProtectedDataset", "default_labels_getter"]
