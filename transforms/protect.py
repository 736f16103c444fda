"""torchvision v2 adapters: a label-aware `Protect` transform and its batch form `ProtectBatch`.

Both call the same tensor core as every other adapter (`ue_datasets.apply.core.protect_batch`), so
they give the same pixels as the ``datasets.map`` function and the shard rewriters. A protection that
finds noise by text (T2UE) takes each sample's caption (``texts_getter``), or a prompt made from its
label with ``class_names`` (`ue_datasets.apply.texts.TextSource`, as the other adapters make it).
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

from ..apply.core import needs_keys, needs_labels, needs_texts, protect_batch, uses_keys
from ..apply.images import normalize_mode, pil_to_tensor, tensor_to_pil
from ..apply.texts import TextSource, caption_text
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


def _texts(protection: Protection, source: TextSource, captions: Any, labels: Any,
           keys: list[str] | None) -> list[str]:
    """The text of each sample: its caption (``str`` or UTF-8 ``bytes``; one, or one per image), else the
    prompt ``source`` makes from its label (a number, or a tensor, array or list of them)."""
    if captions is not None:
        captions = [captions] if isinstance(captions, (str, bytes)) else list(captions)
        return [caption_text("caption", c) for c in captions]
    if not source.class_names:
        raise UEDatasetsError("this protection finds each sample's noise by its text: give texts_getter=... "
                              "(captions) or class_names=... (prompts made from labels)")
    if labels is None:
        raise UEDatasetsError("prompts are made from labels: give the labels (labels_getter), or the captions "
                              "(texts_getter)")
    labels = torch.as_tensor(labels).reshape(-1).tolist()
    return source.texts(protection, None, labels, keys or [None] * len(labels))


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
        texts_getter: ``inputs -> caption(s)`` (``str``, or a list for batched images), for protections
            that find noise by text (T2UE): ``lambda inputs: inputs[1]`` for ``(image, caption)`` samples.
        class_names: names by class id: without ``texts_getter``, a text protection makes each sample's
            prompt from its label (``labels_getter``) with ``template``.
        template: the prompt template, with ``{name}``; default: the protection's own.
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
        texts_getter: Getter | None = None,
        class_names: Sequence[str] = (),
        template: str | None = None,
    ):
        super().__init__()
        self.protection = as_protection(protection)
        self.labels_getter, self.keys_getter, self.device = labels_getter, keys_getter, device
        self.unfitted = unfitted
        self.texts_getter = texts_getter
        self.text_source = TextSource(None, tuple(class_names), template)

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
        if needs_texts(self.protection):
            captions = None if self.texts_getter is None else self.texts_getter(inputs)
            from_labels = captions is None and self.text_source.class_names and self.labels_getter is not None
            out["texts"] = _texts(self.protection, self.text_source, captions,
                                  self.labels_getter(inputs) if from_labels else None, out.get("keys"))
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
    further (label-blind) transforms in ``then``; ``unfitted`` as for `Protect`. A protection that finds
    noise by text (T2UE) takes each sample's caption from ``texts_getter`` (``sample -> caption``, given
    the dataset's whole sample: ``lambda s: s[1]`` for ``(image, caption)``), or the prompt of its label
    with ``class_names`` and ``template``.

    A ``DataLoader`` with a ``batch_size`` fetches through `__getitems__`, which protects the whole
    batch in one core call per image size: the same pixels as sample by sample, several times faster
    (``recipes/bench_adapters.py``).
    """

    def __init__(self, dataset: Any, protection: Protection | str | os.PathLike, then: Callable | None = None,
                 unfitted: str = "error", texts_getter: Getter | None = None, class_names: Sequence[str] = (),
                 template: str | None = None):
        self.dataset, self.then, self.texts_getter = dataset, then, texts_getter
        self.protect = Protect(protection, keys_getter=lambda inputs: inputs[2], unfitted=unfitted,
                               texts_getter=None if texts_getter is None else lambda inputs: inputs[3],
                               class_names=class_names, template=template)

    def __len__(self) -> int:
        return len(self.dataset)

    def _caption(self, sample: Any) -> Any:
        return None if self.texts_getter is None else self.texts_getter(sample)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        image, label = sample[:2]
        image, label = self.protect(image, label, str(index), self._caption(sample))[:2]
        return self._finish(image, label)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices`` (one DataLoader batch), their images protected together.

        PIL images and ``(C, H, W)`` plain or ``tv_tensors.Image`` tensors go through one
        `protect_batch` call (grouped there by size and dtype); a batch holding anything else is
        fetched sample by sample, as `__getitem__` does.
        """
        whole = [self.dataset[i] for i in indices]
        samples, captions = [s[:2] for s in whole], [self._caption(s) for s in whole]
        if not all(_single_image(image) for image, _ in samples):
            return [self._finish(*self.protect(image, label, str(i), caption)[:2])
                    for i, (image, label), caption in zip(indices, samples, captions)]
        labels = [label for _, label in samples]
        conditions = self.protect._conditions((None, labels, [str(i) for i in indices], captions))
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

    A protection that finds noise by text (T2UE) takes ``texts`` (one caption per image), else prompts
    made from ``labels`` with ``class_names`` and ``template``; `collate` reads each sample's caption with
    ``texts_getter`` (``sample -> caption``: ``lambda s: s[1]`` for ``(image, caption)`` samples).
    """

    def __init__(self, protection: Protection | str | os.PathLike, device: torch.device | str | None = None,
                 unfitted: str = "error", texts_getter: Getter | None = None, class_names: Sequence[str] = (),
                 template: str | None = None):
        super().__init__()
        self.protection = as_protection(protection)
        self.device, self.unfitted = device, unfitted
        self.texts_getter = texts_getter
        self.text_source = TextSource(None, tuple(class_names), template)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, keys: list[str] | None = None,
        texts: Sequence[str | bytes] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if needs_texts(self.protection):
            texts = _texts(self.protection, self.text_source, texts, labels,
                           None if keys is None else [str(k) for k in keys])
        out = protect_batch(self.protection, images, labels=labels if needs_labels(self.protection) else None,
                            keys=keys, device=self.device, unfitted=self.unfitted, texts=texts)
        return out, labels

    def collate(self, batch: list[Any]) -> Any:
        """``collate_fn``: ``(image, label)`` samples, or ``(image, label, key)`` for protections that
        find noise by key, to ``(protected images, labels)`` (the second items collated, captions too)."""
        images, labels = default_collate([s[:2] for s in batch])
        keys = [str(s[2]) for s in batch] if len(batch[0]) > 2 else None
        texts = None if self.texts_getter is None else [self.texts_getter(s) for s in batch]
        return self(images, labels, keys, texts)
