"""Package version and the protection artifact format version."""

__version__ = "0.1.0"

#: Version of the on-disk artifact layout (manifest.json + tensors.safetensors).
#: Bump when a change makes older readers misinterpret new artifacts.
ARTIFACT_FORMAT = 1
