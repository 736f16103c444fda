"""Exceptions raised by ue-datasets. Every error a user can trigger derives from `UEDatasetsError`."""

from __future__ import annotations


class UEDatasetsError(Exception):
    """Base class for the errors ue-datasets raises on bad input or bad state."""


class ArtifactError(UEDatasetsError):
    """A protection artifact is missing, tampered with, truncated or of a newer format."""


class SampleError(UEDatasetsError):
    """One sample cannot be protected; the message names its source and key.

    Attributes:
        source: the shard, file or dataset the sample comes from.
        key: the sample's key (``__key__`` of a webdataset sample, a row index elsewhere).
        reason: what is wrong, without the location.
    """

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = str(source), str(key), reason
        super().__init__(f"{self.source}: sample {self.key!r}: {reason}")

    def __reduce__(self):
        return (SampleError, (self.source, self.key, self.reason))


class SourceError(UEDatasetsError):
    """A whole input (shard, file, dataset directory) is unreadable or empty."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = str(source), reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):
        return (SourceError, (self.source, self.reason))


class OutputError(UEDatasetsError):
    """An output cannot be written (disk full, read-only, no permission); nothing is left under its name."""

    def __init__(self, output: str, reason: str):
        self.output, self.reason = str(output), reason
        super().__init__(f"{self.output}: {reason}")

    def __reduce__(self):
        return (OutputError, (self.output, self.reason))
