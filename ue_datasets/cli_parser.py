"""The options of every ``ue-datasets`` command, and the help that teaches them.

Kept free of heavy imports: ``ue-datasets --help`` (of any command) imports nothing but the standard
library and this package's small modules.
"""

from __future__ import annotations

import argparse

from .cli_fit_parser import add_fit_parsers
from .cli_types import add_engine_arguments, positive
from .version import __version__

#: Kept equal to `ue_datasets.apply.images.DEFAULT_MAX_PIXELS` (a test checks it) so that `--help`
#: does not import the image stack.
DEFAULT_MAX_PIXELS = 100_000_000
#: Kept equal to `ue_datasets.apply.protect.DEFAULT_MAX_SKIPPED` and `ue_datasets.apply.shards.DEFAULT_BATCH_SIZE`.
DEFAULT_MAX_SKIPPED = "1%"
DEFAULT_BATCH_SIZE = 256

EPILOG = """\
The flow: `fit` computes a protection and saves it as an artifact directory (keep it secret: it can
regenerate the protection); `protect` applies it to a dataset; `verify` checks a protected output
before you publish it; `inspect` shows what an artifact is; `audit` measures how well it protects.
Try `ue-datasets demo` first: it protects a small real sample shipped with the package.
"""


class _Parser(argparse.ArgumentParser):
    """Explains the usual cause of stray arguments: a shell glob left unquoted, expanded into many files."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import os

        stray = message.partition("unrecognized arguments: ")[2].split()
        if stray and all(os.path.exists(a) for a in stray[:3]):
            message += (f" ({len(stray)} path(s) left over: the shell expanded an unquoted pattern into "
                        "several files and this option takes one; quote the pattern, as in --input 'data/*.tar')")
        super().error(message)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _add_text_options(p: argparse.ArgumentParser) -> None:
    """Where a text protection (t2ue) finds each sample's text: ``protect`` and ``verify`` take the same."""
    p.add_argument("--caption-field", default=None, metavar="FIELD",
                   help="text protections (t2ue) only: the field/column of each sample's caption, which "
                        "decides its noise (default: 'txt' for shards, as webdataset writes captions; "
                        "datasets and parquet files have no default)")
    p.add_argument("--class-names", default=None, metavar="FILE",
                   help="text protections (t2ue) only: a file of class names, one per line in class-id order; "
                        "without --caption-field each sample's text is then a prompt made from its label "
                        "(--label-field) and its class name. A dataset's ClassLabel label column gives its "
                        "names by default")
    p.add_argument("--template", default=None, metavar="TEXT",
                   help="with --class-names: the prompt, with {name} for the class name, such as "
                        "\"a photo of a {name}.\" (default: the protection's own templates)")


def build_parser() -> argparse.ArgumentParser:
    fmt = _Formatter
    parser = _Parser(
        prog="ue-datasets",
        description="Make image datasets unlearnable: fit a protection, then apply it to shards and datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ue-datasets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_fit_parsers(sub, fmt)

    protect = sub.add_parser(
        "protect",
        formatter_class=fmt,
        help="apply a protection to webdataset shards, a save_to_disk dataset or parquet files",
        description=(
            "Apply a protection. SRC is webdataset shards (a .tar path or URL, a brace pattern such as "
            "'data/train-{000..009}.tar', a glob or a folder), a save_to_disk dataset directory, or parquet "
            "files; DST takes the same form (a folder of shards or parquet files with the same names, or a "
            "dataset directory), and never the input or a place the input pattern would read back. Every "
            "image of a sample is protected and written as lossless PNG (WebP or JPEG with --format), or the "
            "sample fails; every other "
            "field is kept byte for byte. Each output file has one writer (NAME.lock), is written under a "
            "partial name of its own and renamed when complete, with a NAME_stats.json (its size and sha256) "
            "beside it; rerunning skips files that check out against their stats and redoes the rest, and a "
            "second run into the same folder takes the files the first is not writing. Nothing that "
            "ue-datasets did not write is replaced or deleted, with or without --overwrite."
        ),
    )
    protect.add_argument("--protection", required=True, help="artifact directory made by `ue-datasets fit`")
    protect.add_argument("--input", required=True, nargs="+", metavar="SRC",
                         help="shards, a dataset directory or parquet files; several shard or parquet inputs may "
                              "follow (an unquoted glob the shell expanded is fine)")
    protect.add_argument("--output", required=True, metavar="DST", help="where to write, in the same form as SRC")
    protect.add_argument("--label-field", default=None,
                         help="field/column with the class id (default: 'cls' for shards, 'label' for datasets and parquet)")
    protect.add_argument("--image-field", default=None,
                         help="field/column with the image (default: first image extension of a shard sample; 'image')")
    protect.add_argument("--key-field", default=None,
                         help="column of stable sample keys for datasets and parquet (default: row index); shards use __key__")
    protect.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    protect.add_argument("--encoder", default=None, metavar="SPEC",
                         help="clusters artifacts only: where the surrogate encoder's weights are now (moved, another "
                              "machine), as for `fit clusters --encoder`; they must be the fitted weights (digest "
                              "checked), and the fitted preprocessing is kept")
    protect.add_argument("--workers", type=positive, default=1,
                         help="local engine: processes, each protecting whole shards/files")
    add_engine_arguments(protect, "one task per shard or parquet file, the same output bytes, names and stats, "
                                  "resumable alike")
    protect.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE, help="images per batch of the tensor core")
    protect.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                         help="on a bad sample: stop with an error, or leave it out and record it in the stats")
    protect.add_argument("--max-skipped", default=DEFAULT_MAX_SKIPPED, metavar="N|P%",
                         help="with --on-error skip: if more samples than this (a count, or a share of those read) "
                              "are skipped, the outputs are still written but the command exits with status 1 "
                              "and names the commonest reasons (a wrong --label-field or --num-classes, say)")
    protect.add_argument("--png-level", type=int, choices=range(0, 10), default=1, metavar="0-9",
                         help="PNG compression level (lossless at any level; 1 is fastest); with --format png")
    protect.add_argument("--format", default="png", metavar="FORMAT",
                         help="how protected images are written. Lossless, the pixels exactly as protected: png "
                              "or webp (lossless WebP: about 2x faster to write and a quarter smaller "
                              "than PNG; RGB and RGBA images only, since WebP has no grayscale mode and a grayscale "
                              "sample fails). Lossy, an explicit opt-in: jpeg:Q (JPEG at quality Q in 1-100, no "
                              "chroma subsampling; no alpha), which erases part of the perturbation and warns: "
                              "measure what survives with `ue-datasets audit --defense none,publish:jpeg:Q`. Shard "
                              "image fields are named after the format (jpg -> png, webp or jpg)")
    protect.add_argument("--keep-field", action="append", default=[], metavar="FIELD",
                         help="a field/column that holds images but is published unprotected (a segmentation "
                              "mask, say); repeat for several. Every other image is protected or its sample fails")
    protect.add_argument("--unfitted", choices=("error", "pass"), default="error",
                         help="a sample the protection holds no noise for (a sample-wise EM or SALM bank fitted on "
                              "other data, or whose pixels differ): error (it fails, or is skipped with --on-error "
                              "skip), or pass it through unprotected and count it as `unprotected` in the stats")
    _add_text_options(protect)
    protect.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, metavar="N",
                         help="refuse images that declare more than N pixels (width x height), before decoding "
                              "(Pillow itself refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 million)")
    protect.add_argument("--overwrite", action="store_true",
                         help="redo outputs ue-datasets completed earlier (also with another protection)")
    protect.add_argument("--no-progress", action="store_true", help="no progress bars")

    inspect = sub.add_parser("inspect", formatter_class=fmt, help="print an artifact's manifest (never its secret)",
                             description="Print an artifact's manifest: method, parameters, versions, digest. "
                                         "The secret tensors are not printed; the key is not stored.")
    inspect.add_argument("artifact", metavar="DIR", help="artifact directory")
    inspect.add_argument("--verify", action="store_true",
                         help="also load the tensors and check the digest (and re-hash a noise bank's every file)")

    verify = sub.add_parser(
        "verify", formatter_class=fmt,
        help="check that an output about to be published is protected and leaks nothing",
        description="Check a protected output before publishing it: every file matches its stats and was "
                    "written with this artifact, and the output folder holds no other file; with --clean, each "
                    "sample's label (and, for shards, every field but the protected images) must equal the clean "
                    "sample's, and the protection of each clean image (every image of a shard sample) is "
                    "recomputed and compared pixel for pixel (written with --format jpeg:Q, with the protection encoded "
                    "as protect writes it, and differences are reported, not failed; unprotected, tampered, foreign "
                    "samples and clean "
                    "samples absent from the output without being listed as skipped in the stats are named by "
                    "key); nothing in it holds a local path, the artifact's digest, artifact files or leftover "
                    ".lock/.partial- files. Exit status: 0 ok, 1 problems found, 2 error.")
    verify.add_argument("--protection", required=True, help="artifact directory the output was protected with")
    _add_text_options(verify)
    verify.add_argument("--input", required=True, metavar="PROTECTED",
                        help="the protected output: shards, dataset directory or parquet files")
    verify.add_argument("--clean", metavar="SRC", nargs="+", default=None,
                        help="the source it was protected from, as given to protect's --input (several shard or "
                             "parquet inputs may follow); without it pixels are not checked, only stats")
    verify.add_argument("--sample", type=positive, default=None, metavar="N",
                        help="check N samples drawn at random (default: all)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the --sample draw")
    verify.add_argument("--label-field", default=None,
                        help="field/column with the class id, as given to protect (default: 'cls' / 'label')")
    verify.add_argument("--image-field", default=None,
                        help="field/column of the clean source with the image, as given to protect (default: every "
                             "image field of a shard sample; 'image')")
    verify.add_argument("--keep-field", action="append", default=[], metavar="FIELD",
                        help="a field/column kept unprotected, as given to protect; it must equal the clean one "
                             "byte for byte. Repeat for several")
    verify.add_argument("--key-field", default=None, help="column of sample keys for tables (default: row index)")
    verify.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    verify.add_argument("--encoder", default=None, metavar="SPEC",
                        help="clusters artifacts only: where the surrogate encoder's weights are now, as for protect")
    verify.add_argument("--report", metavar="FILE", default=None,
                        help="also write the full report as JSON (it names your paths: keep it out of the output)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bars")

    audit = sub.add_parser(
        "audit",
        formatter_class=fmt,
        help="train models on protected and clean data and report what they learned",
        description=(
            "Train a target model on the protected training set and, as the baseline, on the clean one; test "
            "on the clean test set after every epoch; report peak and final accuracy (early stopping is an "
            "attack) under each defense an adversary would use, with imperceptibility metrics (L-inf, L2, "
            "PSNR, SSIM between clean and protected images of the same key) and an image grid. Writes "
            "report.json, report.md, accuracy.png and grid.png. Sources take the forms `protect` accepts."
        ),
    )
    audit.add_argument("--protected", required=True, metavar="SRC", help="the protected training set")
    audit.add_argument("--clean", metavar="SRC", help="the clean training set (baseline and imperceptibility)")
    audit.add_argument("--test", required=True, metavar="SRC", help="the clean test set")
    audit.add_argument("--label-field", default=None,
                       help="field/column with the class id (default: 'cls' for shards, 'label' otherwise)")
    audit.add_argument("--image-field", default=None, help="field/column with the image (default: auto / 'image')")
    audit.add_argument("--key-field", default=None, help="column of sample keys for tables (default: row index)")
    audit.add_argument("--model", default="small-cnn",
                       help="small-cnn (CPU-fast), resnet18 (CIFAR-style) or any torchvision classifier name")
    audit.add_argument("--epochs", type=positive, default=10, help="training epochs per setting")
    audit.add_argument("--batch-size", type=positive, default=128, help="training batch size")
    audit.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9, cosine schedule)")
    audit.add_argument("--seed", type=int, default=0, help="seed of initialisation, order and random defenses")
    audit.add_argument("--defense", default="none",
                       help="comma list: none, jpeg[:Q] (Q=10), grayscale, bdr[:BITS] (2), median[:K] (3), "
                            "blur[:SIGMA] (0.1), upload[:Q] (resize+crop+JPEG 75), augment (crop+flip), "
                            "at[:EPS] (PGD L-inf adversarial training, EPS/255, 10 steps; 8), publish:FORMAT (as "
                            "`protect --format FORMAT` writes: png and webp are identities, jpeg:Q shows how much "
                            "protection JPEG output keeps; audit a lossless output with it)")
    audit.add_argument("--relabel", default=None,
                       help="the attacker's labelling: merge:N (N super-classes), 'old:new,...' or a JSON file")
    audit.add_argument("--probe", action="store_true",
                       help="also report a linear probe on a SimCLR encoder trained on each set without labels")
    audit.add_argument("--no-baseline", action="store_true", help="do not train on the clean set")
    audit.add_argument("--protection", metavar="DIR", default=None,
                       help="the artifact the protected set was made with (the protector's secret); enables, for "
                            "cluster-wise protections (clusters), the purity diagnostic of its clusters and the "
                            "oracle bound (needs --clean)")
    audit.add_argument("--no-oracle", action="store_true",
                       help="with --protection: report the cluster purity but do not train the oracle set (the same "
                            "perturbations given by the attacker's labels instead of the protector's clusters)")
    audit.add_argument("--authorized", metavar="DIR", default=None,
                       help="a UGE artifact directory (`fit uge`): also train its authorized network, rebuilt with "
                            "its secret initialisation, on the protected set (and on the clean set with a baseline), "
                            "under every defense: the training sets 'authorized' and 'authorized-clean'; not with "
                            "--relabel")
    audit.add_argument("--image-size", type=positive, default=None, help="resize images to SIZE x SIZE on loading")
    audit.add_argument("--limit", type=positive, default=None, help="use at most N training samples per set")
    audit.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    audit.add_argument("-o", "--output", required=True, metavar="REPORT_DIR", help="folder for the report")
    audit.add_argument("--no-progress", action="store_true", help="no progress bars")

    noise = sub.add_parser(
        "noise", formatter_class=fmt, help="make a text-driven protection's noise from text alone (T2UE)",
        description="Make the noise a T2UE protection gives to a text, without any image: the zero-contact step. "
                    "The same artifact, text (and key, sample-wise) give the same bytes on one machine and device. "
                    "A .png OUTPUT shows the noise mapped to grey levels (-eps black, 0 mid-grey, +eps white); a "
                    ".safetensors OUTPUT holds it exactly, float32 (3, SIZE, SIZE), under the name 'noise'.")
    noise.add_argument("--protection", required=True, help="a T2UE artifact directory")
    noise.add_argument("--text", required=True, help='the caption or prompt, e.g. "a photo of a sneaker."')
    noise.add_argument("--key", default=None, help="the sample's key (sample-wise protections only)")
    noise.add_argument("--size", type=positive, default=None,
                       help="side of the noise image (default: the generator's); resized nearest, as protect does")
    noise.add_argument("--device", default="cpu", help="where the generator runs (cpu, cuda...)")
    noise.add_argument("-o", "--output", required=True, metavar="FILE", help="noise.png or noise.safetensors")
    noise.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT file")

    demo = sub.add_parser("demo", formatter_class=fmt, help="protect a small real sample shipped with the package",
                          description="Fit CUDA on 10 classes with the public demo key, protect 300 embedded "
                                      "Fashion-MNIST images (one webdataset shard), and write the protected shard "
                                      "and a before/after image grid.")
    demo.add_argument("-o", "--output", default="ue-datasets-demo", help="folder to write into")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser
