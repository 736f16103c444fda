"""The text a sample is protected by (T2UE): its caption, or a class-name prompt.

A text-driven protection finds each sample's noise from a text alone. Adapters give it that text one
of two ways, and this module is the one place that decides which:

- a **caption**: the sample's text field or column (webdataset ``txt``), used as it is;
- a **class-name prompt** for classification data: ``template.format(name=class_names[label])``. The
  template is the one given, else the protection's first template (``"a photo of a {name}."``) in the
  class-wise mode, or, in the sample-wise mode, one of its templates picked by the sample's key.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from ..artifact import Protection
from ..errors import UEDatasetsError
from .noise import lookup_of

#: CLIP's 18 prompt templates for CIFAR-10 (the development code of T2UE cycles through 18 CLIP-style
#: templates that start with "a photo of a {}."); the first is the class-wise prompt.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {name}.", "a blurry photo of a {name}.", "a black and white photo of a {name}.",
    "a low contrast photo of a {name}.", "a high contrast photo of a {name}.", "a bad photo of a {name}.",
    "a good photo of a {name}.", "a photo of a small {name}.", "a photo of a big {name}.",
    "a photo of the {name}.", "a blurry photo of the {name}.", "a black and white photo of the {name}.",
    "a low contrast photo of the {name}.", "a high contrast photo of the {name}.", "a bad photo of the {name}.",
    "a good photo of the {name}.", "a photo of the small {name}.", "a photo of the big {name}.",
)

def check_template(template: str) -> str:
    """``template`` if it holds ``{name}`` and formats; else a `UEDatasetsError` that says how to write one."""
    try:
        filled = template.format(name="x")
    except (IndexError, KeyError, ValueError) as e:
        raise UEDatasetsError(f"template {template!r} does not format with only {{name}} ({e}); "
                              "write it like \"a photo of a {name}.\"") from None
    if filled == template:
        raise UEDatasetsError(f"template {template!r} has no {{name}} placeholder; "
                              "write it like \"a photo of a {name}.\"")
    return template


def read_class_names(path: str) -> tuple[str, ...]:
    """Class names from a text file, one per line in class-id order (blank lines are refused)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UEDatasetsError(f"cannot read the class names in {path}: {e.strerror or e}") from None
    names = tuple(line.strip() for line in lines)
    while names and not names[-1]:
        names = names[:-1]
    if not names or not all(names):
        raise UEDatasetsError(f"{path}: give one class name per line, in class-id order, with no blank line")
    return names


def caption_text(field: str, caption: object) -> str:
    """A caption read from ``field`` as text (``str``, or UTF-8 ``bytes`` as in shards).

    Raises:
        UEDatasetsError: the caption is missing or is not text (names the field).
    """
    if caption is None:
        raise UEDatasetsError(f"missing caption field {field!r}")
    if isinstance(caption, (bytes, bytearray, memoryview)):
        try:
            return bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            raise UEDatasetsError(f"caption field {field!r} is not UTF-8 text") from None
    if not isinstance(caption, str):
        raise UEDatasetsError(f"caption field {field!r} holds {type(caption).__name__}, not text")
    return caption


def template_for_key(templates: Sequence[str], key: str) -> str:
    """The template a sample-wise protection uses for the sample ``key``: a hash of the key picks it."""
    pick = int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8, person=b"ue-t2ue-").digest(), "big")
    return templates[pick % len(templates)]


@dataclass(frozen=True)
class TextSource:
    """Where a sample's text comes from.

    Attributes:
        field: the caption field (webdataset ``txt``) or column; takes precedence.
        class_names: names by class id, for prompts from the sample's label.
        template: the prompt template (``{name}`` is the class name); default: the protection's.
    """

    field: str | None = None
    class_names: tuple[str, ...] = ()
    template: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.template is not None:
            check_template(self.template)

    def check_resolvable(self) -> None:
        """Raise once, before any sample is read, when no sample could get a text: neither a caption field
        nor class names (so that a setup mistake is not one error per sample)."""
        if self.field is None and not self.class_names:
            raise UEDatasetsError("this protection finds its noise by text: name a caption field or column "
                                  "(--caption-field, text_field=) or give class names (--class-names, class_names=) "
                                  "to make prompts from labels")

    @property
    def from_labels(self) -> bool:
        """Whether texts are prompts made from labels (no caption field, class names given)."""
        return self.field is None and bool(self.class_names)

    def settings(self) -> dict:
        """What decides the texts (and so the output bytes): the options given (none: ``{}``, so that the
        settings of outputs written without texts stay what they were)."""
        given = {"text_field": self.field, "class_names": list(self.class_names), "template": self.template}
        return {k: v for k, v in given.items() if v not in (None, [])}

    def text(self, protection: Protection, *, caption: object = None, label: object = None,
             key: str | None = None) -> str:
        """The text of one sample: its caption (``str`` or UTF-8 ``bytes``), else its class's prompt.

        Raises:
            UEDatasetsError: no caption and no class names, a caption that is not text, or a label
                with no class name.
        """
        if self.field is not None:
            return caption_text(self.field, caption)
        if not self.class_names:
            raise UEDatasetsError("this protection finds its noise by text: name a caption field (--caption-field) "
                                  "or give class names (--class-names) to make prompts from labels")
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise UEDatasetsError(f"label {label!r} is not an integer class id")
        if not 0 <= int(label) < len(self.class_names):
            raise UEDatasetsError(f"label {label!r} has no class name ({len(self.class_names)} names given)")
        return self.template_of(protection, key).format(name=self.class_names[int(label)])

    def texts(self, protection: Protection, captions: Sequence[object] | None, labels: Sequence[object] | None,
              keys: Sequence[str]) -> list[str]:
        """`text` for a batch (``captions`` or ``labels`` as this source reads them)."""
        return [self.text(protection, caption=None if captions is None else captions[i],
                          label=None if labels is None else labels[i], key=k) for i, k in enumerate(keys)]

    def template_of(self, protection: Protection, key: str | None) -> str:
        """The given template; else the protection's first (class-wise) or one picked by ``key`` (sample-wise)."""
        if self.template is not None:
            return self.template
        templates = protection.params.get("templates") or TEMPLATES
        if "keys" not in lookup_of(protection).needs:  # class-wise
            return templates[0]
        if key is None:
            raise UEDatasetsError("a sample-wise text protection picks each sample's prompt by its key: pass keys")
        return template_for_key(templates, key)
