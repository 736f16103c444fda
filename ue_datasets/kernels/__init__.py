"""Kernels: the tensor functions that both stages use, beside the methods and adapters built on them.

As torchvision keeps ``transforms/v2/functional`` beside its transform classes: plain functions on
tensors with their shapes and dtypes stated, no method, artifact or file in sight.

- `noise`: the additive-noise kernel shared by every noise method (`add_delta`).
- `convolution`: CUDA's per-sample filtering (`convolve`, `filter_images`).
- `nearest`: nearest-center search (k-means at fit time, cluster lookup at apply time).
- `samples`: sample identity, keys and pixel checksums (fitted samples are found by both).
"""
