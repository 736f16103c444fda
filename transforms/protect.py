"""torchvision v2 adapters: a label-aware `Protect` transform and its batch form `ProtectBatch`.

Both call the same tensor core as every other adapter (`ue_datasets.apply.core.protect_batch`), so
they give the same pixels as the ``datasets.map`` function and the shard rewriters.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..apply.core import needs_keys, needs_labels, protect_batch, uses_keys
from ..apply.images import normalize_mode, pil_to_tensor, tensor_to_pil
from ..artifact import Protection, as_protection
from ..errors import UEDatasetsError

Getter = Callable[[Any], Any]


def default_labels_getter(inputs: Any) -> Any:
    """The label of a sample: the second item of a tuple, or a ``label``/``labels``/``cls`` dict key."""
    if isinstance(inputs, (tuple, list)) and len(inputs) >= 2:
        return inputs[1]
    if isinstance(inputs, dict):
        for key in inputs:
            if isinstance(key, str) and (key.lower() in ("label", "labels", "cls", "target") or "label" in key.lower()):
                return inputs[key]
    raise UEDatasetsError(
        "Protect could not find the labels: pass (image, label) or a dict with a 'label' key, "
        "or give labels_getter=..."
    )


def _keys(keys: Any) -> list[str]:
    """Sample keys as strings, as the other adapters write them: ``3``, ``torch.tensor(3)``,
    ``np.int64(3)`` and ``"3"`` all give ``"3"``; tensors and arrays give one key per element."""
    if hasattr(keys, "tolist"):  # tensors and numpy values
        keys = keys.tolist()
    if isinstance(keys, (str, numbers.Integral)):
        return [str(keys)]
    return [str(k.tolist() if hasattr(k, "tolist") else k) for k in keys]


def _pixels(image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
    """The plain tensor the core takes: uint8 ``(C, H, W)`` of a (mode-normalised) PIL image, or the
    tensor itself (``(C, H, W)`` or ``(B, C, H, W)``, uint8 or float) without its tv_tensor type."""
    if isinstance(image, PIL.Image.Image):
        return pil_to_tensor(normalize_mode(image))
    return image.as_subclass(torch.Tensor)


def _single_image(image: Any) -> bool:
    """Whether `Protect` takes ``image`` as one image: a PIL image or a ``(C, H, W)`` image tensor."""
    if isinstance(image, PIL.Image.Image):
        return True
    return (isinstance(image, tv_tensors.Image) or type(image) is torch.Tensor) and image.ndim == 3


def _restore(out: torch.Tensor, like: PIL.Image.Image | torch.Tensor) -> PIL.Image.Image | torch.Tensor:
    """``out`` as the type of the image it came from: a PIL image, the same tv_tensor, or a plain tensor."""
    if isinstance(like, PIL.Image.Image):
        return tensor_to_pil(out)
    return tv_tensors.wrap(out, like=like) if isinstance(like, tv_tensors.TVTensor) else out


class Protect(v2.Transform):
    """Protect images with a fitted protection; label-aware, for Datasets and DataLoaders.

    Accepts what v2 transforms accept: ``(image, label)`` tuples, dicts, a lone image (for methods
    that need no label). Images may be PIL (L, LA, RGB, RGBA, P...), ``tv_tensors.Image`` or plain
    tensors, single ``(C, H, W)`` or batched ``(B, C, H, W)`` with one label per image; uint8 or float
    in [0, 1]. Each comes back as the same type, dtype and device. As in torchvision, when a sample
    holds a PIL image or a ``tv_tensors.Image``, plain tensors are left alone (they are labels...);
    otherwise the first plain tensor is the image.

    One image per call costs a full core call: on 28x28 Fashion-MNIST on CPU a loader with `Protect`
    in its transforms runs about 6x slower than without, where `ProtectedDataset` and
    `ProtectBatch.collate`, which protect whole batches, cost about 1.4x (``recipes/bench_adapters.py``).

    Args:
        protection: a `Protection` or the directory of a saved artifact.
        labels_getter: ``inputs -> labels``; default: second tuple item or a ``label`` dict key.
        keys_getter: ``inputs -> sample key(s)``, needed by protections that cover a fraction or keep
            noise per sample (a noise bank); used by Unlearnable Clusters to find fitted samples' clusters.
        device: where to compute (``None``: where the image is; ``"auto"``: CUDA when available).
        unfitted: images a sample-wise protection holds no noise for: ``"error"`` raises naming their
            keys, ``"pass"`` returns them unprotected.

    torchvision's MNIST, CIFAR and ImageFolder datasets take no joint ``transforms=`` argument: wrap
    them in `ProtectedDataset` instead. In a joint pipeline of ``(image, label)`` samples:

    >>> import torch
    >>> from PIL import Image
    >>> from torchvision.transforms import v2
    >>> from ue_datasets import fit
    >>> p = fit("cuda", num_classes=10, key=123456789)
    >>> t = v2.Compose([Protect(p), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    >>> image, label = t(Image.new("RGB", (28, 28), (200, 120, 40)), 3)
    >>> image.shape, image.dtype, label
    (torch.Size([3, 28, 28]), torch.float32, 3)
    """

    _transformed_types = (torch.Tensor, PIL.Image.Image)

    def __init__(
        self,
        protection: Protection | str | os.PathLike,
        labels_getter: Getter | None = default_labels_getter,
        keys_getter: Getter | None = None,
        device: torch.device | str | None = None,
        unfitted: str = "error",
    ):
        super().__init__()
        self.protection = as_protection(protection)
        self.labels_getter, self.keys_getter, self.device = labels_getter, keys_getter, device
        self.unfitted = unfitted

    def extra_repr(self) -> str:
        return f"method={self.protection.method}, id={self.protection.id}"

    def _conditions(self, inputs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if needs_labels(self.protection):
            if self.labels_getter is None:
                raise UEDatasetsError(f"method {self.protection.method!r} needs labels; give labels_getter")
            labels = self.labels_getter(inputs)
            out["labels"] = torch.as_tensor(labels).reshape(-1)
        if needs_keys(self.protection) and self.keys_getter is None:
            raise UEDatasetsError("this protection needs each sample's key (it covers a fraction of the samples, or "
                                  "keeps noise per sample): give keys_getter=...")
        if uses_keys(self.protection) and self.keys_getter is not None:
            out["keys"] = _keys(self.keys_getter(inputs))
        return out

    def _protect(self, image: Any, conditions: dict[str, Any]) -> Any:
        x = _pixels(image)
        batched = x.ndim == 4
        out = protect_batch(self.protection, x if batched else x[None], device=self.device, unfitted=self.unfitted,
                            **conditions)
        return _restore(out if batched else out[0], image)

    def forward(self, *inputs: Any) -> Any:
        inputs = inputs if len(inputs) > 1 else inputs[0]
        flat, spec = tree_flatten(inputs)
        has_typed = any(isinstance(x, (PIL.Image.Image, tv_tensors.Image)) for x in flat)
        targets = []
        for i, x in enumerate(flat):
            if isinstance(x, (PIL.Image.Image, tv_tensors.Image)) or (
                not has_typed and type(x) is torch.Tensor and not targets and x.ndim >= 3
            ):
                targets.append(i)
        if not targets:
            return inputs
        conditions = self._conditions(inputs)
        for i in targets:
            flat[i] = self._protect(flat[i], conditions)
        return tree_unflatten(flat, spec)


class ProtectedDataset(torch.utils.data.Dataset):
    """Wrap a map-style dataset of ``(image, label)`` pairs so that its images come out protected.

    torchvision's MNIST, CIFAR and ImageFolder datasets take no joint ``transforms=`` argument, so the
    label-aware `Protect` goes around them: ``ProtectedDataset(FashionMNIST(root), protection)``. With a
    protection that covers a fraction or keeps noise per sample, the sample index is the key. Put
    further (label-blind) transforms in ``then``; ``unfitted`` as for `Protect`.

    A ``DataLoader`` with a ``batch_size`` fetches through `__getitems__`, which protects the whole
    batch in one core call per image size: the same pixels as sample by sample, several times faster
    (``recipes/bench_adapters.py``).
    """

    def __init__(self, dataset: Any, protection: Protection | str | os.PathLike, then: Callable | None = None,
                 unfitted: str = "error"):
        self.dataset, self.then = dataset, then
        self.protect = Protect(protection, keys_getter=lambda inputs: inputs[2], unfitted=unfitted)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[index][:2]
        image, label, _ = self.protect(image, label, str(index))
        return self._finish(image, label)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices`` (one DataLoader batch), their images protected together.

        PIL images and ``(C, H, W)`` plain or ``tv_tensors.Image`` tensors go through one
        `protect_batch` call (grouped there by size and dtype); a batch holding anything else is
        fetched sample by sample, as `__getitem__` does.
        """
        samples = [self.dataset[i][:2] for i in indices]
        if not all(_single_image(image) for image, _ in samples):
            return [self._finish(*self.protect(image, label, str(i))[:2])
                    for i, (image, label) in zip(indices, samples)]
        labels = [label for _, label in samples]
        conditions = self.protect._conditions((None, labels, [str(i) for i in indices]))
        pixels = [_pixels(image) for image, _ in samples]
        out = protect_batch(self.protect.protection, pixels, device=self.protect.device,
                            unfitted=self.protect.unfitted, **conditions)
        return [self._finish(_restore(x, image), label) for x, (image, label) in zip(out, samples)]

    def _finish(self, image: Any, label: Any) -> tuple[Any, Any]:
        return (image if self.then is None else self.then(image)), label


class ProtectBatch(torch.nn.Module):
    """Batch form: protect ``(B, C, H, W)`` images with ``(B,)`` labels after or inside the DataLoader.

    ``ProtectBatch(p)(images, labels) -> (protected, labels)``, computed on the images' device (so on
    the GPU after ``images.cuda()``), or on ``device``. `collate` is a ``collate_fn`` that stacks a
    list of ``(image tensor, label)`` samples with ``default_collate`` and protects the batch in the
    DataLoader workers.
    """

    def __init__(self, protection: Protection | str | os.PathLike, device: torch.device | str | None = None,
                 unfitted: str = "error"):
        super().__init__()
        self.protection = as_protection(protection)
        self.device, self.unfitted = device, unfitted

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = protect_batch(self.protection, images, labels=labels, keys=keys, device=self.device,
                            unfitted=self.unfitted)
        return out, labels

    def collate(self, batch: list[Any]) -> Any:
        """``collate_fn``: ``(image, label)`` samples, or ``(image, label, key)`` for protections that
        find noise by key, to ``(protected images, labels)``."""
        images, labels = default_collate([s[:2] for s in batch])
        keys = [str(s[2]) for s in batch] if len(batch[0]) > 2 else None
        return self(images, labels, keys)
