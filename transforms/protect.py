"""torchvision v2 adapters: a label-aware `Protect` transform and its batch form `ProtectBatch`.

Both call the same tensor core as every other adapter (`ue_datasets.apply.core.protect_batch`), so
they give the same pixels as the ``datasets.map`` function and the shard rewriters.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..apply.core import needs_keys, needs_labels, protect_batch, uses_keys
from ..apply.images import normalize_mode, pil_to_tensor, tensor_to_pil
from ..artifact import Protection, load_protection
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


def _as_protection(protection: Protection | str | os.PathLike) -> Protection:
    return protection if isinstance(protection, Protection) else load_protection(protection)


def _keys(keys: Any) -> list[str]:
    """Sample keys as strings, as the other adapters write them: ``3``, ``torch.tensor(3)``,
    ``np.int64(3)`` and ``"3"`` all give ``"3"``; tensors and arrays give one key per element."""
    if hasattr(keys, "tolist"):  # tensors and numpy values
        keys = keys.tolist()
    if isinstance(keys, (str, numbers.Integral)):
        return [str(keys)]
    return [str(k.tolist() if hasattr(k, "tolist") else k) for k in keys]


class Protect(v2.Transform):
    """Protect images with a fitted protection; label-aware, for Datasets and DataLoaders.

    Accepts what v2 transforms accept: ``(image, label)`` tuples, dicts, a lone image (for methods
    that need no label). Images may be PIL (L, LA, RGB, RGBA, P...), ``tv_tensors.Image`` or plain
    tensors, single ``(C, H, W)`` or batched ``(B, C, H, W)`` with one label per image; uint8 or float
    in [0, 1]. Each comes back as the same type, dtype and device. As in torchvision, when a sample
    holds a PIL image or a ``tv_tensors.Image``, plain tensors are left alone (they are labels...);
    otherwise the first plain tensor is the image.

    Args:
        protection: a `Protection` or the directory of a saved artifact.
        labels_getter: ``inputs -> labels``; default: second tuple item or a ``label`` dict key.
        keys_getter: ``inputs -> sample key(s)``, needed by protections that cover a fraction; used by
            Unlearnable Clusters to find fitted samples' stored clusters.
        device: where to compute (``None``: where the image is; ``"auto"``: CUDA when available).

    Example::

        ds = torchvision.datasets.FashionMNIST(root, transforms=Protect("protection/"))  # (img, target)
        t = v2.Compose([Protect(p), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    """

    _transformed_types = (torch.Tensor, PIL.Image.Image)

    def __init__(
        self,
        protection: Protection | str | os.PathLike,
        labels_getter: Getter | None = default_labels_getter,
        keys_getter: Getter | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.protection = _as_protection(protection)
        self.labels_getter, self.keys_getter, self.device = labels_getter, keys_getter, device

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
            raise UEDatasetsError("this protection covers a fraction of samples: give keys_getter=...")
        if uses_keys(self.protection) and self.keys_getter is not None:
            out["keys"] = _keys(self.keys_getter(inputs))
        return out

    def _protect(self, image: Any, conditions: dict[str, Any]) -> Any:
        if isinstance(image, PIL.Image.Image):
            out = protect_batch(self.protection, pil_to_tensor(normalize_mode(image))[None], device=self.device,
                                **conditions)
            return tensor_to_pil(out[0])
        plain = image.as_subclass(torch.Tensor)
        batched = plain.ndim == 4
        out = protect_batch(self.protection, plain if batched else plain[None], device=self.device, **conditions)
        out = out if batched else out[0]
        return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.TVTensor) else out

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
    protection that covers a fraction, the sample index is the key. Put further (label-blind)
    transforms in ``then``.
    """

    def __init__(self, dataset: Any, protection: Protection | str | os.PathLike, then: Callable | None = None):
        self.dataset, self.then = dataset, then
        self.protect = Protect(protection, keys_getter=lambda inputs: inputs[2])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        image, label = self.dataset[index][:2]
        image, label, _ = self.protect(image, label, str(index))
        return (image if self.then is None else self.then(image)), label


class ProtectBatch(torch.nn.Module):
    """Batch form: protect ``(B, C, H, W)`` images with ``(B,)`` labels after or inside the DataLoader.

    ``ProtectBatch(p)(images, labels) -> (protected, labels)``, computed on the images' device (so on
    the GPU after ``images.cuda()``), or on ``device``. `collate` is a ``collate_fn`` that stacks a
    list of ``(image tensor, label)`` samples with ``default_collate`` and protects the batch in the
    DataLoader workers.
    """

    def __init__(self, protection: Protection | str | os.PathLike, device: torch.device | str | None = None):
        super().__init__()
        self.protection = _as_protection(protection)
        self.device = device

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return protect_batch(self.protection, images, labels=labels, keys=keys, device=self.device), labels

    def collate(self, batch: list[Any]) -> Any:
        images, labels = default_collate(batch)[:2]
        return self(images, labels)
