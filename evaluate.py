"""Zero-shot clean and robust accuracy of any CLIP model on the benchmark datasets (docs/evaluation.md).

Zero-shot classifier: one prompt template per dataset (data_lists/templates.tsv), class names refined (`_`/`-` ->
space, lower case), text features computed once per dataset, logits 100 · s(f(x), T). A sample counts as robust to
an attack only if it is classified correctly clean and at x_adv. Every sample is counted once, with any number of
processes; random starts and random targets depend only on the sample's index.

Attacks (ℓ∞, --eps in units of 1/255; ATTACKS):
    pgd          PGD, 20 steps, α = 1/255, cross-entropy at CLIP's scale 100 (the AGFT protocol; F.cross_entropy as
                 the papers' code, or without cancellation with --stable-ce: docs/evaluation.md)
    cw           PGD, same schedule, on the C&W margin max_{j≠y} z_j − z_y
    apgd-ce      APGD (Croce & Hein 2020), 100 iterations, cross-entropy
    apgd-dlr     APGD on the DLR loss (not applicable to 2-class sets: reported as n/a)
    aa           robust only if the sample survives apgd-ce and apgd-dlr (the AGFT paper's AutoAttack)
    pgd-t-rand   targeted PGD-20 towards a random wrong class
    pgd-t-least  targeted PGD-20 towards the clean least-likely class
  Table 6 of the AGFT paper (torchattacks 3.5.1's algorithms at its defaults, as the AGFT code runs them; 20 steps):
    mi, ni       MI-FGSM, NI-FGSM (momentum 1.0, step α, no random start)
    di, ti       DI²-FGSM (random resize-and-pad, p = 0.5), TI-FGSM (DI + 15×15 Gaussian-smoothed gradient)
    pi, pi++     PI-FGSM, PI-FGSM++ (patch-wise; step 10·ε/steps, --alpha unused)
    mi-t, di-t, ti-t, ni-t   the same towards a random wrong class (pgd-t-rand's target)
  AutoAttack's other two:
    apgd-t       APGD-100 on the targeted DLR loss, 9 target classes (not applicable below 4 classes: n/a)
    square       Square Attack, 5000 queries (--steps), margin loss, gradient-free: a check for gradient masking;
                 p's schedule stretched to the budget (torchattacks' default)
    square-aa    the same with p's schedule not stretched, as AutoAttack builds it (its group: autoattack)
    apgd-ce-x5   apgd-ce with 5 restarts, each on the images no earlier one fooled (RobustVLM's APGD-CE)
    aa-ce-t      robust only if the sample survives apgd-ce-x5 and apgd-t (RobustVLM's AutoAttack)
  Groups: table6 (the 15 columns of the AGFT paper's Table 6, in its order), autoattack. An attack that others are
  made of (apgd-ce in aa and aa-ce-t) runs once per image when several of them are asked for.

Protocols (--protocol; explicit --attacks, --steps, --alpha, --samples, --template override them; docs/evaluation.md):
    agft         pgd, cw (20 steps, α = 1/255) and aa with 10 iterations (the AGFT code's torchattacks AutoAttack)
    advflyp      pgd, cw (10 steps, α = 1/255) and aa with 100 iterations (the AdvFLYP code's autoattack package);
                 ImageNet-R and ImageNet-Sketch with the AdvFLYP paper's prompts (its appendix)
    robustvlm    aa-ce-t (APGD-CE with 5 restarts + APGD-T, 100 iterations) on 1000 images per dataset (RobustVLM's)

Reproduce the AGFT paper's evaluation rows (ViT-B/32, ε = 1/255, the 15 datasets; Tables 1, 2, 12, 13), and its
Table 6 (its 15 attack columns in one run; its AA has 10 iterations, which the protocol sets):
    torchrun --nproc_per_node=2 evaluate.py --model runs/agft-eps1/model.pt --datasets all --protocol agft \\
        --out runs/agft-eps1/eval.json
    torchrun --nproc_per_node=2 evaluate.py --model runs/agft-eps1/model.pt --datasets all --protocol agft \\
        --attacks table6 --out runs/agft-eps1/table6.json
The AdvFLYP paper's rows (its 14 datasets; its ImageNet shifts: --datasets imagenet-shifts) and RobustVLM's:
    python evaluate.py --model runs/advflyp/model.pt --datasets advflyp --protocol advflyp --out runs/advflyp/eval.json
    python evaluate.py --model runs/fare-eps2/model.pt --datasets all --protocol robustvlm --eps 2 --out rvlm.json
The original CLIP row: --model ViT-B/32. Another project's released image encoder (its layout is recognised; the
layouts: docs/released-weights.md), e.g. RobustVLM's FARE at ε = 1/255:
    python evaluate.py --model ViT-B/32 --vision-weights vitb32_fare_eps_1.pt --datasets all --attacks pgd,cw,aa
The demo (no download, a few minutes on a CPU):
    python evaluate.py --model demo --datasets demo --attacks pgd,cw,apgd-ce,apgd-dlr,aa,pgd-t-rand,pgd-t-least --eps 4
Writes --out (JSON) and a Markdown table beside it (same name, .md), and prints the table.
Benchmark (no dataset, no weights; images/s per attack go to the log and to "img_per_s" in --out):
    python evaluate.py --model random:ViT-B/32 --datasets synthetic --samples 512 --attacks pgd,aa --attack-all \\
        --out runs/bench-eval.json

Structure metrics (--metrics conf,smax,smean,top5-iou,phi or all; docs/metrics.md; AGFT Table 9, §4.4, AdvFLYP Eq. 14),
averaged over every image, on clean images and on the adversarial images of the first attack:
    python evaluate.py --model runs/agft-eps1/model.pt --datasets all --attacks pgd,cw,aa --metrics all --intervals
The images' embeddings, clean and at the first attack, for a t-SNE figure (figures.py tsne; no accuracies):
    python evaluate.py --model runs/agft-eps1/model.pt --datasets CIFAR10 --samples 2000 --attacks pgd \\
        --save-features runs/agft-eps1/cifar10-features.npz
Every accuracy has a 95% Wilson interval (the mean over datasets: a MOVER interval). The per-image results go to
--per-sample (default: --out with .samples.npz); two evaluations of the same images and attacks are compared, with a
paired 95% interval (Newcombe's hybrid score interval), by
    python evaluate.py --compare runs/agft-eps1/eval.json runs/tecoa-eps1/eval.json
Test-time defences (--defense ttc|clipure-cos; defenses.py, docs/defenses.md): the model behind the defence too,
each attack in each --attack-mode (non-adaptive, authors, known-noise, adaptive: BPDA, EOT, the exact gradient,
Square), keyed "<attack>@<mode>" beside the undefended numbers, with the checks for gradient masking:
    python evaluate.py --model demo --datasets demo --attacks pgd,apgd-ce --eps 4 --defense ttc --sanity-eps 32
Resume: the results are saved after every dataset and every --save-every seconds; rerun the same command (same
--out) and it continues where it stopped, with the numbers of an uninterrupted run, with any number of processes.
SIGTERM / SIGUSR1 save and exit with status 75 (common.PREEMPTED), SIGINT (Ctrl-C) with 130: the batch in hand is
interrupted between two attack iterations and redone by the rerun (docs/cluster.md).

Sections, in the order data flows (search for the `# ---- name` rule):
    config                      parse_args: datasets, attacks, protocols, metrics
    helpers                     load_datasets, fixed_subset (--samples), the Markdown tables
    zero-shot evaluation        zero_shot_samples (per image: clean, each attack, metrics, embeddings, defended),
                                the structure metrics
    defended evaluation         DefenseRun, the attack modes' variants, defended_results, the masking diagnostics
    intervals (95%)             Wilson, MOVER, the paired difference
    per-image results, resume   SampleStore (--per-sample), open_store, gathering rows across processes
    reports                     the results JSON and its table (and its "defense" entry)
    compare                     --compare A.json B.json
    embeddings                  --save-features (figures.py tsne)
    main                        main, evaluate
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import textwrap
import time
from statistics import NormalDist

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

import common
import defenses
import eval_datasets
from attacks import (ATTACK_MIN_CLASSES, ATTACKS, COMBINED_ATTACKS, DEFAULT_ATTACK_STEPS, attack_square, early_exit,
                     run_attack)

ATTACK_LABELS = {"pgd": "PGD-{n}", "cw": "C&W-{n}", "apgd-ce": "APGD-CE-{n}", "apgd-dlr": "APGD-DLR-{n}",
                 "aa": "AA (APGD-CE + APGD-DLR, {n} it.)", "pgd-t-rand": "PGD-{n} targeted, random class",
                 "pgd-t-least": "PGD-{n} targeted, least-likely class", "mi": "MI-FGSM-{n}", "ni": "NI-FGSM-{n}",
                 "di": "DI²-FGSM-{n}", "ti": "TI-FGSM-{n}", "pi": "PI-FGSM-{n}", "pi++": "PI-FGSM++-{n}",
                 "mi-t": "MI-FGSM-{n} targeted, random class", "di-t": "DI²-FGSM-{n} targeted, random class",
                 "ti-t": "TI-FGSM-{n} targeted, random class", "ni-t": "NI-FGSM-{n} targeted, random class",
                 "apgd-t": "APGD-T-{n} (9 target classes)", "aa-ce-t": "AA (APGD-CE ×5 restarts + APGD-T, {n} it.)",
                 "apgd-ce-x5": "APGD-CE-{n} (5 restarts)",
                 "square": "Square ({n} queries)", "square-aa": "Square, AutoAttack's schedule ({n} queries)"}
METRIC_LABELS = {"conf": "conf", "smax": "smax", "smean": "smean", "top5-iou": "top-5 IoU (%)", "phi": "φ (°)"}
# --datasets groups: each paper's evaluation sets (docs/evaluation.md; the AdvFLYP paper's §4.1)
DATASET_GROUPS = {"all": list(eval_datasets.AGFT_DATASETS), "agft": list(eval_datasets.AGFT_DATASETS),
                  "advflyp": ["CIFAR10", "CIFAR100", "STL10", "Caltech101", "Caltech256", "OxfordIIITPet", "Flowers102",
                              "Food101", "StanfordCars", "SUN397", "Country211", "FGVCAircraft", "EuroSAT", "DTD"],
                  "imagenet-shifts": ["ImageNet-R", "ImageNet-A", "ImageNet-Sketch", "ObjectNet"]}
# attacks that take --alpha as their step size (the others: APGD adapts its own, PI's is 10·ε/steps, Square's squares)
STEP_SIZE_ATTACKS = {"pgd", "cw", "pgd-t-rand", "pgd-t-least", "mi", "ni", "di", "ti", "mi-t", "ni-t", "di-t", "ti-t"}
# The AGFT paper's Table 6, in its column order (PGD MI DI² TI NI PI PI++ C&W AA PGDT PGDTL MIT DI²T TIT NIT):
# --attacks table6 (its AA is 10-iteration AutoAttack: use it with --protocol agft).
ATTACK_GROUPS = {"table6": ["pgd", "mi", "di", "ti", "ni", "pi", "pi++", "cw", "aa", "pgd-t-rand", "pgd-t-least",
                            "mi-t", "di-t", "ti-t", "ni-t"],
                 "autoattack": ["apgd-ce", "apgd-dlr", "apgd-t", "square-aa", "aa", "aa-ce-t"]}
# Each paper's evaluation as its code runs it (docs/evaluation.md): attacks (if --attacks is not given), every attack's
# iterations (when --steps does not name it), the PGD/C&W step size and the images per dataset (unless --alpha or
# --samples are given). Attacks a protocol does not name keep DEFAULT_ATTACK_STEPS.
PROTOCOLS = {
    "agft": {"about": "the AGFT code: PGD-20 and C&W-20 at α = 1/255; AA = torchattacks' AutoAttack(version='rand'), "
                      "APGD-CE + APGD-DLR with 10 iterations; Table 6's attacks at 20 steps",
             "attacks": ["pgd", "cw", "aa"], "steps": {**dict.fromkeys(ATTACK_GROUPS["table6"], 20), "aa": 10},
             "alpha": 1.0, "samples": None},
    "advflyp": {"about": "the AdvFLYP code: PGD-10 and C&W-10 at α = 1/255; AA = the autoattack package's APGD-CE + "
                         "APGD-DLR with 100 iterations; its appendix's prompts for ImageNet-R and ImageNet-Sketch",
                "attacks": ["pgd", "cw", "aa"], "steps": {"pgd": 10, "cw": 10, "aa": 100}, "alpha": 1.0,
                "samples": None,
                "templates": {"ImageNet-R": "This is an artistic rendering of {}.",  # the AdvFLYP paper's appendix
                              "ImageNet-Sketch": "This is a sketch of a {}."}},
    "robustvlm": {"about": "RobustVLM (FARE) with CLIP_benchmark: AutoAttack of APGD-CE (5 restarts, on the images "
                           "no earlier restart fooled) + APGD-T (9 targets, 1 restart), 100 iterations, 1000 images "
                           "per dataset",
                  "attacks": ["aa-ce-t"], "steps": {"aa-ce-t": 100, "apgd-ce": 100, "apgd-ce-x5": 100, "apgd-t": 100},
                  "alpha": 1.0,
                  "samples": 1000},
}


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=help_lists(),
                                formatter_class=common.HelpFormatter)
    p.add_argument("--model", default="ViT-B/32", help="released CLIP name, checkpoint file, random:ARCH or demo")
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="image-encoder weights (a robust model another project released: docs/released-weights.md) "
                        "loaded into "
                        "--model's image encoder; text encoder from --model")
    p.add_argument("--datasets", default="all",
                   help="comma-separated dataset names or groups (listed below): all (the AGFT paper's 15), advflyp "
                        "(the AdvFLYP paper's 14), imagenet-shifts, demo, folder:PATH, or synthetic (random images "
                        "and 1000 classes, for benchmarks)")
    p.add_argument("--data-root", default="./data", help="directory holding the datasets (layout: docs/datasets.md)")
    p.add_argument("--download", action="store_true", help="download the datasets torchvision can fetch")
    p.add_argument("--class-names", default=None,
                   help="names for WordNet-id classes (ImageNet and variants): 'wnid name' lines, or one name per "
                        "line in sorted wnid order (default: ImageNet's devkit in DATA_ROOT/imagenet)")
    p.add_argument("--template", default=None, help="prompt template for every dataset, e.g. 'a photo of a {}.'")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help="evaluate as a paper's code does (attacks, iterations, α, images per dataset; listed below); "
                        "--attacks, --steps, --alpha and --samples override it")
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated attack names or groups ({', '.join(ATTACK_GROUPS)}), listed below; 'none' "
                        "for clean accuracy only (default: the protocol's, else pgd)")
    p.add_argument("--eps", type=float, default=1.0, help="ℓ∞ budget ε in units of 1/255")
    p.add_argument("--alpha", type=float, default=None,
                   help="step size of the PGD-like attacks in units of 1/255 (default 1; APGD adapts its own)")
    p.add_argument("--steps", default=None,
                   help="iterations: N for every attack, or NAME=N,... for some (default: the protocol's, else each "
                        "attack's default, listed below; Square: queries)")
    p.add_argument("--samples", default=None,
                   help="evaluate a fixed random subset of N images per dataset, or 'all' (default: the protocol's, "
                        "else all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per process and batch")
    p.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default="off",
                   help="mixed precision for the model and the attacks (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed for random starts, random targets, --samples, random:ARCH")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (docs/performance.md)")
    p.add_argument("--stable-ce", action="store_true",
                   help="the cross-entropy of pgd, pgd-t-*, and Table 6's attacks without cancellation: at logit "
                        "scale 100 F.cross_entropy (the papers' code, the default) drops a confident image's true "
                        "class from the gradient (docs/attacks.md); recorded in the results")
    p.add_argument("--no-early-exit", action="store_true",
                   help="keep attacking an image that an APGD iterate has fooled (apgd-*, aa, aa-ce-t): the same "
                        "per-image results, slower; by default it leaves the batch (docs/performance.md)")
    p.add_argument("--attack-all", action="store_true",
                   help="attack every image, also those misclassified clean (same accuracies; for benchmarks with "
                        "random weights, where few images are classified correctly)")
    p.add_argument("--out", default="results.json", help="results file (JSON); the Markdown table goes beside it")
    p.add_argument("--metrics", default="none",
                   help="structure metrics, comma-separated from conf, smax, smean, top5-iou, phi, or all: on clean "
                        "images and on the first attack's adversarial images, averaged over every image")
    p.add_argument("--reference-model", default=None,
                   help="top5-iou's reference, the original CLIP the checkpoint came from (default: the 'model' of "
                        "the run's args.json beside a model.pt / last.pt)")
    p.add_argument("--intervals", action="store_true",
                   help="show 95%% Wilson intervals in the Markdown table (the JSON always has them)")
    p.add_argument("--per-sample", default=None,
                   help="per-image results (.npz, no pickle), also the state a rerun continues from (default: --out "
                        "with .samples.npz)")
    p.add_argument("--save-every", type=float, default=60.0,
                   help="save the per-image results at least every this many seconds (and after every dataset)")
    p.add_argument("--save-features", default=None, metavar="FILE.npz",
                   help="instead of accuracies, write every evaluated image's embedding f(x), clean and at the first "
                        "attack's x_adv, with its label, to FILE.npz (no pickle), for figures.py tsne; then exit")
    p.add_argument("--defense", choices=list(defenses.DEFENSES), default=None,
                   help="evaluate the model behind a test-time defence too (docs/defenses.md): its clean accuracy "
                        "and each attack in each --attack-mode, beside the undefended numbers")
    p.add_argument("--attack-mode", default="non-adaptive,authors,adaptive",
                   help=f"with --defense, comma list of {', '.join(defenses.ATTACK_MODES)} (known-noise: randomised "
                        "defences only); default non-adaptive,authors,adaptive")
    p.add_argument("--eot", type=int, default=8,
                   help="the adaptive attacker's draws per gradient (EOT) against a randomised defence (default 8)")
    p.add_argument("--defense-draws", type=int, default=1,
                   help="draws of a randomised defence's randomness per image: an image counts as correct (clean) and "
                        "robust only if classified correctly in every draw; the per-draw mean of the clean accuracy "
                        "is reported too (clean_draws; default 1)")
    p.add_argument("--square-queries", type=int, default=1000,
                   help="queries of the adaptive mode's Square on the defended model (0: none; default 1000)")
    p.add_argument("--sanity-eps", type=float, default=None,
                   help="with --defense: also PGD-20 at this ε (1/255 units, e.g. 32) on the undefended model and "
                        "through the adaptive view; accuracy far from 0 says gradient masking is suspected")
    for key, default in defenses.TTC_DEFAULTS.items():
        p.add_argument(f"--ttc-{key}", type=type(default), default=None,
                       help=f"TTC's {defenses.TTC_HELP[key]} (default {default:g}, the official code's)")
    for key, default in defenses.CLIPURE_DEFAULTS.items():
        p.add_argument(f"--clipure-{key.replace('_', '-')}", type=type(default), default=None,
                       help=f"CLIPure-Cos's {defenses.CLIPURE_HELP[key]} (default {default:g}, the official code's)")
    p.add_argument("--clipure-form", choices=["per-image", "batch"], default="per-image",
                   help="CLIPure-Cos's step normalised per image (default: results do not depend on batching) or, as "
                        "the official code, over each 2 consecutive images of a call (its batch size)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print A − B per dataset and on average with paired 95%% intervals (same images and "
                        "attacks), then exit")
    args = p.parse_args(argv)
    if args.compare:
        return args

    specs = [s.strip() for s in args.datasets.split(",") if s.strip()]
    specs = [n for s in specs for n in DATASET_GROUPS.get(s.lower(), [s])]
    known = {n.lower(): n for n in list(eval_datasets.EVAL_DATASETS) + ["demo", "synthetic"]}  # case-insensitive
    for s in specs:
        if not s.startswith("folder:") and s.lower() not in known:
            raise common.UsageError(f"--datasets {s}: unknown dataset (one of {', '.join(known.values())}, "
                                    f"{', '.join(DATASET_GROUPS)}, folder:PATH)")
    args.datasets = list(dict.fromkeys(s if s.startswith("folder:") else known[s.lower()] for s in specs))
    if not args.datasets:
        raise common.UsageError("--datasets: no dataset given")
    protocol = PROTOCOLS[args.protocol] if args.protocol else {"attacks": ["pgd"], "steps": {}, "alpha": 1.0,
                                                               "samples": None}
    attacks = args.attacks if args.attacks is not None else ",".join(protocol["attacks"])
    attacks = [] if attacks.strip().lower() in ("", "none") else [a.strip() for a in attacks.split(",") if a.strip()]
    attacks = [a for s in attacks for a in ATTACK_GROUPS.get(s.lower(), [s])]
    for a in attacks:
        if a not in ATTACKS:
            raise common.UsageError(f"--attacks {a}: unknown attack (one of {', '.join(ATTACKS)}, or a group: "
                                    f"{', '.join(ATTACK_GROUPS)})")
    args.attacks = list(dict.fromkeys(attacks))
    args.steps = attack_steps(args.steps, args.attacks, protocol["steps"])
    args.alpha = protocol["alpha"] if args.alpha is None else args.alpha
    if args.samples is None or args.samples.strip().lower() == "all":
        args.samples = protocol["samples"] if args.samples is None else None
    else:
        try:
            args.samples = int(args.samples)
        except ValueError:
            raise common.UsageError(f"--samples {args.samples}: expected a number of images or 'all'") from None
    for name in ("eps", "alpha"):
        if getattr(args, name) < 0:
            raise common.UsageError(f"--{name} {getattr(args, name)}: must be >= 0")
    for name in ("samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.workers < 0:
        raise common.UsageError(f"--workers {args.workers}: must be >= 0")
    if args.template is not None and "{}" not in args.template:
        raise common.UsageError(f"--template {args.template!r}: must contain {{}} where the class name goes")
    if os.path.isdir(args.out):
        raise common.UsageError(f"--out {args.out}: is a directory, expected a file name")
    common.check_parent_dirs(args.out, "--out")
    if os.path.splitext(args.out)[1].lower() == ".md":
        raise common.UsageError(f"--out {args.out}: names the JSON results; the Markdown table goes beside them, "
                                f"with .md for their extension (e.g. --out {os.path.splitext(args.out)[0]}.json "
                                f"writes {args.out})")
    metrics = [] if args.metrics.strip().lower() in ("", "none") else [m.strip() for m in args.metrics.split(",")]
    metrics = [m for s in metrics for m in (STRUCTURE_METRICS if s.lower() == "all" else [s])]
    for m in metrics:
        if m not in STRUCTURE_METRICS:
            raise common.UsageError(f"--metrics {m}: unknown metric (one of "
                                    f"{', '.join(STRUCTURE_METRICS)}, all)")
    args.metrics = [m for m in STRUCTURE_METRICS if m in metrics]  # in the table's order
    if "phi" in args.metrics and not args.attacks:
        raise common.UsageError("--metrics phi: needs an attack (φ is the angle between f(x) and f(x_adv))")
    if "top5-iou" in args.metrics:
        args.reference_model = args.reference_model or default_reference(args)
        if args.reference_model is None:
            raise common.UsageError(f"--metrics top5-iou: give --reference-model (the original CLIP that {args.model} "
                                    "came from; found by itself only for a run's model.pt/last.pt beside args.json)")
    elif args.defense == "ttc":  # TTC's τ with the original CLIP when the model is a fine-tuned run's (official code)
        args.reference_model = args.reference_model or default_reference(args)
    else:
        args.reference_model = None  # used by top5-iou and TTC alone
    args.per_sample = args.per_sample or os.path.splitext(args.out)[0] + ".samples.npz"
    if os.path.isdir(args.per_sample) or os.path.abspath(args.per_sample) == os.path.abspath(args.out):
        raise common.UsageError(f"--per-sample {args.per_sample}: must be a file name other than --out")
    if args.save_every < 0:
        raise common.UsageError(f"--save-every {args.save_every}: must be >= 0")
    check_defense_args(args)
    if args.save_features is not None:
        if not args.save_features.endswith(".npz") or os.path.isdir(args.save_features):
            raise common.UsageError(f"--save-features {args.save_features}: expected a file name ending in .npz")
        common.check_parent_dirs(args.save_features, "--save-features")
    return args


def check_defense_args(args):
    """--defense and its flags: args.attack_mode becomes a list, args.defense_settings the defence's settings (None
    without --defense); args.defense_columns the defended columns of the results."""
    args.attack_mode = [m.strip() for m in args.attack_mode.split(",") if m.strip()]
    args.defense_settings, args.defense_columns = None, []
    if args.defense is None:
        return
    cls, _ = defenses.DEFENSES[args.defense]
    for m in args.attack_mode:
        if m not in defenses.ATTACK_MODES:
            raise common.UsageError(f"--attack-mode {m}: unknown mode (one of {', '.join(defenses.ATTACK_MODES)})")
        if m == "known-noise" and not cls.randomised:
            raise common.UsageError(f"--attack-mode known-noise: {args.defense} draws nothing at random; the mode "
                                    "applies to randomised defences (ttc)")
    args.attack_mode = [m for m in defenses.ATTACK_MODES if m in args.attack_mode]  # in a fixed order
    for flag in ("eot", "defense_draws"):
        if getattr(args, flag) < 1:
            raise common.UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.square_queries < 0:
        raise common.UsageError(f"--square-queries {args.square_queries}: must be >= 0")
    if args.sanity_eps is not None and args.sanity_eps <= 0:
        raise common.UsageError(f"--sanity-eps {args.sanity_eps}: must be > 0")
    if args.amp == "fp16":
        raise common.UsageError("--defense with --amp fp16: the defences differentiate inside the classifier (TTC's "
                                "counterattack, CLIPure's purification), past the fp16 gradient guard of the attacks; "
                                "use --amp bf16 or off")
    if args.compile:
        raise common.UsageError("--defense with --compile: the exact gradient through CLIPure and TTC's counterattack "
                                "need double backward or nested gradients, which torch.compile does not support here")
    if args.save_features:
        raise common.UsageError("--defense with --save-features: the embeddings are the undefended model's; run "
                                "without --defense")
    prefix = "ttc_" if args.defense == "ttc" else "clipure_"
    given = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and k != "clipure_form"}
    settings = {**defenses.DEFENSES[args.defense][1], **{k: v for k, v in given.items() if v is not None}}
    if args.defense == "clipure-cos":
        settings["group"] = 1 if args.clipure_form == "per-image" else 2
    args.defense_settings = settings
    args.defense_columns = defended_columns(args.attacks, args.attack_mode, args.sanity_eps)


def help_lists():
    """--help's closing lists: the dataset names, the attacks with their default iterations, groups and protocols."""
    wrap = lambda text: textwrap.fill(text, 118, initial_indent="  ", subsequent_indent="    ",
                                         break_on_hyphens=False)  # noqa: E731
    return "\n".join([
        "datasets (--datasets; layout under --data-root: docs/datasets.md):",
        wrap(", ".join(eval_datasets.EVAL_DATASETS) + "; demo; synthetic; folder:PATH"),
        "dataset groups:", *(wrap(f"{g} = {', '.join(d)}") for g, d in DATASET_GROUPS.items()),
        "attacks (--attacks; default iterations in brackets):",
        wrap(", ".join(f"{a} [{n}]" for a, n in DEFAULT_ATTACK_STEPS.items())),
        "attack groups:", *(wrap(f"{g} = {', '.join(a)}") for g, a in ATTACK_GROUPS.items()),
        "protocols (--protocol):", *(wrap(f"{name}: {p['about']}; attacks {','.join(p['attacks'])}")
                                     for name, p in PROTOCOLS.items())])


def attack_steps(spec, attacks, protocol_steps):
    """--steps -> {attack: iterations} for `attacks`: spec is None, 'N' (every attack) or 'NAME=N,...' (those named);
    the rest from the protocol, else DEFAULT_ATTACK_STEPS."""
    steps = {a: protocol_steps.get(a, DEFAULT_ATTACK_STEPS[a]) for a in attacks}
    if spec is None:
        return steps
    items = [s.strip() for s in spec.split(",") if s.strip()]
    try:
        if len(items) == 1 and "=" not in items[0]:
            if int(items[0]) < 1:
                raise common.UsageError(f"--steps {spec}: must be >= 1")
            given = dict.fromkeys(attacks, int(items[0]))
        else:
            given = {name.strip(): int(n) for name, n in (item.split("=") for item in items)}
    except ValueError:
        raise common.UsageError(f"--steps {spec}: expected N or NAME=N,... (e.g. aa=10,pgd=20)") from None
    for name, n in given.items():
        if name not in attacks:
            raise common.UsageError(f"--steps {name}={n}: {name} is not among the attacks ({', '.join(attacks)})")
        if n < 1:
            raise common.UsageError(f"--steps {name}={n}: must be >= 1")
    return {**steps, **given}


def default_reference(args):
    """top5-iou's default reference: the original CLIP the evaluated weights came from, i.e. the `model` entry of the
    run's args.json beside a model.pt / last.pt written by the training scripts; None when it cannot be known."""
    # (with --vision-weights, released weights loaded into --model, --model itself is the original: one more line)
    folder, name = os.path.split(os.path.abspath(args.model))
    run_args = os.path.join(folder, "args.json")
    if name in ("model.pt", "last.pt") and os.path.isfile(run_args):
        try:
            with open(run_args) as f:
                return json.load(f).get("model")
        except (OSError, ValueError, AttributeError):
            return None
    return None


# -------------------------------------------------------------------------------------------------------- helpers
def load_datasets(args, dist, resolution):
    """Every --datasets entry as (name, dataset, class names, template), all checked before any attack runs.
    Rank 0 goes first (it alone downloads or unpacks, however long that takes), then the first rank of each other
    node, then the rest read what they left (common.prepare_files)."""
    def load(may_write):
        sets = [eval_datasets.eval_dataset(s, args.data_root, resolution, args.download and may_write, args.class_names)
                for s in args.datasets]
        names = [s[0] for s in sets]
        if len(set(names)) < len(names):
            raise common.UsageError(f"--datasets: two datasets named {max(names, key=names.count)}")
        return sets
    return common.prepare_files(dist, load)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def fixed_subset(dataset, n, seed):
    """The same n images on every run and process: a seeded permutation's first n indices, in dataset order."""
    if n is None or n >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return torch.utils.data.Subset(dataset, index.tolist())


def summarize(results, columns):
    """Unweighted mean over datasets per column, leaving out datasets where the column is None (not applicable)."""
    mean, notes = {}, []
    for c in columns:
        values = [r[c] for r in results.values() if r[c] is not None]
        mean[c] = round(sum(values) / len(values), 2) if values else None
        left_out = [name for name, r in results.items() if r[c] is None]
        if left_out:
            notes.append(f"{c} is not applicable to {', '.join(left_out)} (fewer than 3 classes): null, and its "
                         f"mean is over the other {len(values)} dataset(s)")
    return mean, notes


def markdown_table(results, mean, columns, labels, title, ci=None):
    """The papers' layout: datasets as columns, settings as rows, the average last. ci: the report's "ci95" entry,
    to show each accuracy's 95% interval beside it (--intervals)."""
    names = list(results)

    def cell(v, interval=None):
        if v is None:
            return "n/a"
        return f"{v:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval is not None else "")

    ci_of = lambda name, c: ci["datasets"][name].get(c) if ci else None  # noqa: E731
    lines = [title, "", "| | " + " | ".join(names) + " | Average |", "|---|" + "---:|" * (len(names) + 1),
             "| images | " + " | ".join(str(results[n]["n"]) for n in names) + " | |"]
    partial = [c for c in columns if mean[c] is not None and any(results[n][c] is None for n in names)]
    for c in columns:
        row = [labels[c]] + [cell(results[n][c], ci_of(n, c)) for n in names] + \
              [cell(mean[c], ci["mean"].get(c) if ci else None) + ("*" if c in partial else "")]
        lines.append("| " + " | ".join(row) + " |")
    if partial:
        lines += ["", "\\* mean over the datasets where the attack applies (DLR needs at least 3 classes)."]
    if ci:
        lines += ["", f"[lo, hi]: 95% interval; {ci['method']}"]
    return "\n".join(lines) + "\n"


def metrics_table(metrics, report_metrics, first_label):
    """Structure metrics in the same layout: one row per metric and kind of image (clean, x_adv of the first
    attack), datasets as columns, the unweighted average last."""
    names = list(report_metrics["datasets"])
    lines = ["Structure metrics (" + report_metrics["over"] + ")", "",
             "| | " + " | ".join(names) + " | Average |", "|---|" + "---:|" * (len(names) + 1)]
    for m in metrics:
        for which in ("clean", "adv"):
            values = [report_metrics["datasets"][n].get(m, {}).get(which) for n in names]
            mean = report_metrics["mean"].get(m, {}).get(which)
            if all(v is None for v in values):
                continue
            label = f"{METRIC_LABELS[m]}, {'clean' if which == 'clean' else first_label}"
            cells = ["n/a" if v is None else f"{v:.2f}" for v in values + [mean]]
            lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- zero-shot evaluation
def clock(device):
    """time.perf_counter() after the device's queued work has finished (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# Structure metrics (--metrics; docs/metrics.md), per image, in the units the papers report them. Each is computed from
# logits or features that the evaluation computes anyway (the clean pass and the classification of x_adv); only
# top5-iou needs one more forward pass, of the reference model on the clean image.
STRUCTURE_METRICS = ("conf", "smax", "smean", "top5-iou", "phi")


def max_softmax(logits):
    """conf (AGFT paper, Table 9): the largest softmax probability ×100, logits at CLIP's scale: (B, C) -> (B,)."""
    return 100 * logits.float().softmax(-1).amax(-1)


def similarity_max_mean(sim):
    """smax, smean (AGFT paper, Table 9): the max and the mean cosine similarity to the C class prompts, ×100:
    (B, C) -> (B,), (B,)."""
    return 100 * sim.float().amax(-1), 100 * sim.float().mean(-1)


def topk_iou(scores, ref_scores, k=5):
    """|top-k ∩ top-k_ref| / |top-k ∪ top-k_ref| ×100 per image (AGFT paper, §4.4: k = 5): (B, C), (B, C) -> (B,).
    With both sets of size k this is m / (2k − m), m the number of shared classes: 0, 11.1, 25, 42.9, 66.7, 100."""
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, -1).indices, True)  # (B, C)
    ref = torch.zeros_like(ref_scores, dtype=torch.bool).scatter_(1, ref_scores.topk(k, -1).indices, True)
    return 100 * (top & ref).sum(-1).float() / (top | ref).sum(-1).float()


def cosine_deviation(features, adv_features):
    """φ = arccos(cos(f(x), f(x + δ))) in degrees per image (AdvFLYP Eq. 14): (B, D), (B, D) raw features -> (B,).
    Computed as 2·atan2(|u − v|, |u + v|) of the unit vectors u, v in float64: the same angle, without arccos's
    loss of precision near cos = 1 (in float32, angles below ~0.03° would round to 0)."""
    u, v = F.normalize(features.double(), dim=-1), F.normalize(adv_features.double(), dim=-1)
    return torch.rad2deg(2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))).float()


def sample_fields(attacks, metrics, n_classes, defense=None):
    """The per-image results zero_shot_samples gives for a dataset with `n_classes` classes, in order: "label",
    "clean" (correct clean), each applicable attack (correct clean and under attack), then "<metric>.clean" and
    "<metric>.adv" (on x_adv of the first attack; phi is adversarial only). Not applicable, hence absent: an attack
    that needs more classes (ATTACK_MIN_CLASSES), top5-iou with at most 5 classes (the top-5 sets would be all
    classes), and every ".adv" metric when there is no attack or the first one does not apply. defense (a
    DefenseRun): then the defended results (defense_fields)."""
    applicable = [a for a in attacks if n_classes >= ATTACK_MIN_CLASSES.get(a, 2)]
    adv = bool(attacks) and attacks[0] in applicable
    fields = ["label", "clean", *applicable]
    for m in metrics:
        if m == "top5-iou" and n_classes <= 5:
            continue
        fields += ([f"{m}.clean"] if m != "phi" else []) + ([f"{m}.adv"] if adv else [])
    return fields + ([] if defense is None else defense_fields(defense, applicable))


def structure_metrics(metrics, sim, ref_scores, which):
    """The per-image structure metrics of one pass, clean or x_adv (`which`): {"<metric>.<which>": (B,)}, from its
    (B, C) cosine similarities `sim`; top5-iou against `ref_scores` (the reference model's clean logits, None where
    it does not apply). phi is left to the caller: it needs both passes."""
    out = {}
    smax, smean = similarity_max_mean(sim)
    if "conf" in metrics:
        out[f"conf.{which}"] = max_softmax(common.CLIP_LOGIT_SCALE * sim)
    if "smax" in metrics:
        out[f"smax.{which}"] = smax
    if "smean" in metrics:
        out[f"smean.{which}"] = smean
    if "top5-iou" in metrics and ref_scores is not None:
        out[f"top5-iou.{which}"] = topk_iou(sim, ref_scores)  # the order of sim is the order of the logits
    return out


def zero_shot_samples(encoder, text_feats, dataset, dist, attacks=("pgd",), eps=1 / 255, alpha=1 / 255, steps=None,
                      batch_size=256, ctx=contextlib.nullcontext(), seed=0, workers=0, desc=None, timing=None,
                      attack_all=False, metrics=(), reference=None, indices=None, embeddings=False, defense=None):
    """Per-image zero-shot results of `encoder` on `dataset` (or on its images `indices`), class text features
    `text_feats`: yields (index (b,), {field: (b,) CPU tensor}) for each batch of this rank's share, fields as
    sample_fields names them. Every rank yields the same number of batches (a rank with fewer images ends with empty
    ones), so a caller may run a collective after each.

    Logits are common.CLIP_LOGIT_SCALE · s(f(x), T). An image counts as robust to an attack only if it is classified
    correctly both clean and at x_adv (so robust ≤ clean per image). Only clean-correct images are attacked, except
    with attack_all=True (benchmarks) and, when `metrics` are asked for, by the first attack, whose x_adv of every
    image the adversarial metrics are averaged over; the accuracies are the same either way. The metrics reuse the
    features of the clean pass and of the classification of x_adv; top5-iou compares with the top-5 of
    `reference(x)` (the reference model's logits on the clean image; None: the evaluated model itself).
    steps: every attack's iterations (None: DEFAULT_ATTACK_STEPS) or {attack: iterations}. The attacks run on each
    batch while its clean features are in memory; an attack that others are made of runs once per image
    (run_attack), and the combined attacks (COMBINED_ATTACKS) run last so that they find their parts' results.
    timing: a dict to fill with images per second of the clean pass and of each attack (all processes together).
    embeddings=True adds each image's raw embeddings, (b, D) float32: "embedding.clean" f(x) and, when the first
    attack applies, "embedding.adv" f(x_adv) of that attack, run on every image for them as for the metrics.
    defense (a DefenseRun): the results behind the test-time defence too (defended_results)."""
    encoder.eval()
    logits_fn = lambda x: common.CLIP_LOGIT_SCALE * common.cosine_sim(encoder(x), text_feats)  # noqa: E731
    n_classes = len(text_feats)
    applicable = [n_classes >= ATTACK_MIN_CLASSES.get(name, 2) for name in attacks]
    adv_metrics = (bool(metrics) or embeddings) and bool(attacks) and applicable[0]  # the first attack: every image

    def steps_of(name):
        return (steps.get(name) if isinstance(steps, dict) else steps) or DEFAULT_ATTACK_STEPS[name]
    order = sorted(range(len(attacks)), key=lambda k: attacks[k] in COMBINED_ATTACKS)  # parts first, then aa & co.
    indices = range(len(dataset)) if indices is None else indices
    n_batches = -(-(-(-len(indices) // batch_size)) // dist.world)  # ⌈⌈N / B⌉ / W⌉, the same on every rank
    seconds, images = [0.0] * (1 + len(attacks)), [0] * (1 + len(attacks))  # for `timing`; clean, then each attack
    tick = (lambda: clock(dist.device)) if timing is not None else (lambda: 0.0)  # no syncs unless timing

    def evaluate_batch(x, y, index):  # -> {field: (b,) or (b, D) tensor}
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        t = tick()
        with ctx, torch.no_grad():
            features = encoder(x)  # (B, D)
            sim = common.cosine_sim(features, text_feats)  # (B, C)
            ok = (common.CLIP_LOGIT_SCALE * sim).argmax(-1) == y  # (B,) clean-correct
        seconds[0], images[0] = seconds[0] + tick() - t, images[0] + len(y)
        out = {"label": y, "clean": ok, **({"embedding.clean": features.float()} if embeddings else {})}
        ref_scores = None  # (B, C): the reference model's clean logits (AGFT §4.4: its clean top-5 is the anchor)
        if metrics:
            if "top5-iou" in metrics and n_classes > 5:
                with ctx, torch.no_grad():
                    ref_scores = sim if reference is None else reference(x)
            out.update(structure_metrics(metrics, sim, ref_scores, "clean"))
        memo = {}  # an attack that others are made of (APGD-CE in aa) runs once per image (run_attack)
        for k in order:
            name = attacks[k]
            if not applicable[k]:
                continue
            metrics_here = k == 0 and adv_metrics  # the first attack's x_adv of every image, for the metrics
            keep = torch.ones_like(ok) if attack_all or metrics_here else ok
            correct = torch.zeros_like(ok)
            if keep.any():
                t = tick()
                # the metrics' x_adv is APGD's highest-loss fooling iterate, as before early exit (attacks.apgd)
                with ctx, (early_exit(False) if metrics_here else contextlib.nullcontext()):
                    x_adv = run_attack(name, logits_fn, x[keep], y[keep], index[keep.cpu()], eps, alpha,
                                       steps_of(name), seed, memo)
                with ctx, torch.no_grad():
                    adv_features = encoder(x_adv)
                    adv_sim = common.cosine_sim(adv_features, text_feats)
                correct[keep] = ((common.CLIP_LOGIT_SCALE * adv_sim).argmax(-1) == y[keep]) & ok[keep]
                seconds[k + 1], images[k + 1] = seconds[k + 1] + tick() - t, images[k + 1] + int(keep.sum())
                if metrics_here:  # keep is every image
                    out.update(structure_metrics(metrics, adv_sim, ref_scores, "adv"))
                    if "phi" in metrics:
                        out["phi.adv"] = cosine_deviation(features, adv_features)
                    if embeddings:
                        out["embedding.adv"] = adv_features.float()  # (B, D)
            out[name] = correct
        if defense is not None:
            with ctx:
                applied = [a for a, ok_ in zip(attacks, applicable) if ok_]
                out.update(defended_results(defense, logits_fn, x, y, index, ok, applied, steps_of, eps, alpha, seed,
                                            memo, attack_all))
        return out

    done = 0
    batches = iter(common.progress(common.eval_batches(common.eval_loader(dataset, batch_size, dist, workers, indices)),
                                   dist, desc=desc, leave=False))
    while True:
        try:
            x, y, index = next(batches)
        except StopIteration:
            break
        except common.UsageError as e:  # an unreadable image: the caller stops every rank (common.first_error)
            yield torch.zeros(0, dtype=torch.long), {"error": str(e)}
            done += 1
            break
        try:  # a signal stops the batch between two attack iterations (a GPU batch of AutoAttack runs for minutes)
            with common.SIGNALS.interruptible("during an evaluation batch"):
                out = evaluate_batch(x, y, index)
        except common.Stop:  # the batch is thrown away (the rerun redoes it); the caller's requested() stops all
            yield torch.zeros(0, dtype=torch.long), {"stopped": True}
        else:
            yield index, {f: v.cpu() for f, v in out.items()}
        done += 1
    for _ in range(done, n_batches):
        yield torch.zeros(0, dtype=torch.long), {}
    if timing is not None:  # images of all processes over the mean wall time of one process
        work = torch.tensor([seconds, images], dtype=torch.float64, device=dist.device)
        work = common.all_reduce_sum(work, dist).tolist()
        timing.update({name: round(im * dist.world / sec, 2) if sec > 0 else None
                       for name, sec, im in zip(["clean", *attacks], *work)})


# ------------------------------------------------------------------------------------------ defended evaluation
# The defended results of --defense (docs/defenses.md): booleans "clean@defended", "<attack>@<mode>" and, with
# --sanity-eps, "sanity" (the undefended model) and "sanity@adaptive"; and per-image diagnostics "defense.*" (floats,
# averaged in the report's "defense" entry; NaN where not computed).
DEFENSE_DIAGNOSTICS = {"ttc": ("tau.clean", "gate.clean", "tau.adv", "gate.adv"),
                       "clipure-cos": ("grad_ratio", "grad_cos", "grad_zero")}
THREAT_MODEL = ("the attacker knows the weights, the defence and its hyperparameters, not the defender's random draws "
                "(known-noise: told them, a diagnostic); adaptive = per image, the worst case over its variants")


@dataclasses.dataclass
class DefenseRun:
    """What zero_shot_samples needs to evaluate behind a defence: the defence (defenses.build_defense, for this
    dataset's classifier), the attack modes, the attacker's EOT draws, the defender's draws per image, Square's
    queries in the adaptive mode, the large-ε check (None: off)."""
    defense: object
    modes: tuple
    eot: int = 8
    draws: int = 1
    square_queries: int = 1000
    sanity_eps: float = None


def defended_columns(attacks, modes, sanity_eps):
    """The defended accuracy columns, in order: clean, each attack in each mode, the large-ε check."""
    return (["clean@defended", *[f"{a}@{m}" for a in attacks for m in modes]]
            + (["sanity", "sanity@adaptive"] if sanity_eps else []))


def defense_fields(run, applicable):
    """The defended fields, in order, for the applicable attacks: defended_columns, the diagnostics, and with a mode
    of several variants (adaptive) "defense.broken_by.<attack>@<mode>": per image, 1 + the position of the variant
    that broke it, 0 if none did, NaN if not attacked."""
    name = run.defense.name
    several = [m for m in run.modes if len(mode_variants(name, m, run.square_queries)) > 1]
    return (defended_columns(applicable, run.modes, run.sanity_eps)
            + ["defense.clean_draws"] + [f"defense.{d}" for d in DEFENSE_DIAGNOSTICS[name]]
            + [f"defense.broken_by.{a}@{m}" for a in applicable for m in several])


def mode_variants(defense, mode, square_queries):
    """The attacks an attacker in `mode` runs against `defense` (a DEFENSES name), each (kind, view): "undefended"
    (x_adv crafted on the undefended model), "view" (the attack through defence.view(view)), "gate" (TTC's gate
    attack), "square" (Square on the defended model). An image counts as robust in the mode only if it survives every
    one."""
    if mode == "non-adaptive" or (mode == "authors" and defenses.AUTHORS_VIEW[defense] is None):
        return [("undefended", None)]
    if mode in ("authors", "known-noise"):
        return [("view", defenses.AUTHORS_VIEW[defense] if mode == "authors" else "known-noise")]
    return ([("view", v) for v in defenses.ADAPTIVE_VIEWS[defense]] + ([("gate", None)] if defense == "ttc" else [])
            + ([("square", None)] if square_queries else []))


def defended_correct(run, x, index, y):
    """(b,) bool: classified correctly behind the defence in every one of the defender's draws; (b,) the share of
    draws in which it is."""
    with torch.no_grad():
        right = torch.stack([run.defense.predict(x, index, r).argmax(-1) == y for r in range(run.draws)])  # (R, b)
    return right.all(0), right.float().mean(0)


def defended_results(run, logits_fn, x, y, index, ok, attacks, steps_of, eps, alpha, seed, memo, attack_all):
    """One batch behind the defence: {field: (B,)} for defense_fields. An image is robust to an attack in a mode only
    if it is classified correctly behind the defence clean and at every x_adv of the mode's variants
    (mode_variants), in every one of the defender's draws; later variants attack only the images the earlier ones
    left robust. Square and TTC's gate attack do not depend on the attack: each runs once per image and batch."""
    d = run.defense
    clean_ok, share = defended_correct(run, x, index, y)
    out = {"clean@defended": clean_ok, "defense.clean_draws": share}
    keep = torch.ones_like(clean_ok) if attack_all else clean_ok
    xs, ys, ids = x[keep], y[keep], index[keep.cpu()]
    shared = {}  # "gate" / "square" -> {image index: robust}
    first_adv = None  # x_adv of the first attack's first variant in the first mode, for the diagnostics

    def attack(kind, view, name, alive):  # -> x_adv of the images `alive` (positions in xs)
        xa, ya, ia = xs[alive], ys[alive], ids[alive.cpu()]
        if kind == "undefended":
            return run_attack(name, logits_fn, xa, ya, ia, eps, alpha, steps_of(name), seed, memo)
        if kind == "view":  # not memo: the memo holds the undefended model's results
            return run_attack(name, d.view(view, xa, ia, run.eot, run.draws), xa, ya, ia, eps, alpha,
                              steps_of(name), seed)
        if kind == "gate":
            return d.gate_attack(xa, ya, ia, eps, alpha, steps_of(attacks[0]), seed, run.eot)
        square_view = d.view(defenses.ADAPTIVE_VIEWS[d.name][0], xa, ia, 1, run.draws)  # one fresh draw per query
        return attack_square(square_view, xa, ya, ia, eps, alpha, run.square_queries, seed)

    for name in attacks:
        done = {}  # variants -> result: TTC's authors mode is its non-adaptive one, computed once
        for mode in run.modes:
            variants = tuple(mode_variants(d.name, mode, run.square_queries))
            if variants in done:
                out[f"{name}@{mode}"] = done[variants]
                continue
            alive = torch.arange(len(xs), device=x.device)  # positions in xs still robust
            broken_by = torch.zeros(len(xs), device=x.device)  # 1 + the variant that broke the image, 0: none did
            for j, (kind, view) in enumerate(variants, start=1):
                if len(alive) == 0:
                    break
                if kind in ("gate", "square"):  # once per image: attack the images not done yet
                    known = shared.setdefault(kind, {})
                    todo = alive[torch.tensor([i not in known for i in ids[alive.cpu()].tolist()], dtype=torch.bool,
                                              device=x.device)]
                    if len(todo):
                        robust, _ = defended_correct(run, attack(kind, view, name, todo), ids[todo.cpu()], ys[todo])
                        known.update(zip(ids[todo.cpu()].tolist(), robust.tolist()))
                    robust = torch.tensor([known[i] for i in ids[alive.cpu()].tolist()], dtype=torch.bool,
                                          device=x.device)
                    broken_by[alive[~robust]] = j
                    alive = alive[robust]
                    continue
                x_adv = attack(kind, view, name, alive)
                if first_adv is None:
                    first_adv = (alive, x_adv)
                robust, _ = defended_correct(run, x_adv, ids[alive.cpu()], ys[alive])
                broken_by[alive[~robust]] = j
                alive = alive[robust]
            if len(variants) > 1:
                field = torch.full((len(x),), float("nan"), device=x.device)
                field[keep] = broken_by
                out[f"defense.broken_by.{name}@{mode}"] = field
            survived = torch.zeros(len(xs), dtype=torch.bool, device=x.device)
            survived[alive] = True
            result = torch.zeros_like(clean_ok)
            result[keep] = survived
            out[f"{name}@{mode}"] = done[variants] = result & clean_ok
    if run.sanity_eps:  # PGD-20 at a large ε, step 2.5 ε / 20: on the undefended model and through the adaptive view
        big = run.sanity_eps / 255
        out["sanity"], out["sanity@adaptive"] = torch.zeros_like(ok), torch.zeros_like(clean_ok)
        if ok.any():
            x_big = common.attack_pgd(logits_fn, x[ok], y[ok], index[ok.cpu()], big, 2.5 * big / 20, 20, seed)
            with torch.no_grad():
                out["sanity"][ok] = logits_fn(x_big).argmax(-1) == y[ok]
        if len(xs):
            view = d.view(defenses.ADAPTIVE_VIEWS[d.name][0], xs, ids, run.eot, run.draws)
            x_big = common.attack_pgd(view, xs, ys, ids, big, 2.5 * big / 20, 20, seed)
            out["sanity@adaptive"][keep] = defended_correct(run, x_big, ids, ys)[0]
        out["sanity@adaptive"] &= clean_ok
    out.update(defense_diagnostics(run, x, y, index, keep, first_adv))
    return out


def defense_diagnostics(run, x, y, index, keep, first_adv):
    """Per image, the checks for gradient masking (docs/defenses.md). TTC: τ and the gate (1 = counterattack) with
    the defender's first draw, on the clean image and at the first attack's x_adv (NaN where not attacked).
    CLIPure: at the clean image, the gradient of the cross-entropy through the authors' view against the exact one:
    ‖∇_authors‖ / ‖∇_exact‖, their cosine, and 1 where the authors' gradient is exactly 0."""
    d, B = run.defense, len(x)
    nan = lambda: torch.full((B,), float("nan"), device=x.device)  # noqa: E731
    if d.name == "ttc":
        tau, gate = d.gate_stats(x, index)
        out = {"defense.tau.clean": tau.float(), "defense.gate.clean": gate.float(),
               "defense.tau.adv": nan(), "defense.gate.adv": nan()}
        if first_adv is not None and len(first_adv[0]):
            where = keep.nonzero()[:, 0][first_adv[0]]  # positions in the batch
            tau_adv, gate_adv = d.gate_stats(first_adv[1], index[where.cpu()])
            out["defense.tau.adv"][where], out["defense.gate.adv"][where] = tau_adv.float(), gate_adv.float()
        return out
    grads = {}
    for view in ("authors", "exact"):
        fn = d.view(view, x, index)
        grads[view] = common.input_grad(lambda z: common.cross_entropy_per_sample(fn(z), y).sum(),
                                        x).double().flatten(1)
    a, e = grads["authors"], grads["exact"]
    return {"defense.grad_ratio": (a.norm(dim=1) / e.norm(dim=1)).float(),
            "defense.grad_cos": F.cosine_similarity(a, e, dim=1).float(),
            "defense.grad_zero": (a == 0).all(1).float()}


# ------------------------------------------------------------------------------------------- intervals (95%)
Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def wilson_interval(k, n, z=Z95):
    """95% Wilson score interval for a proportion, k successes in n trials (Wilson 1927), as fractions in [0, 1]:
    the p with |k/n − p| ≤ z·sqrt(p(1 − p)/n). Unlike the Wald interval it stays inside [0, 1] and keeps its
    coverage near 0 and 1 (robust accuracies of a few percent, clean accuracies near 100)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mover_mean(estimates, intervals):
    """Interval for the unweighted mean (1/K) Σ θ_k of K independent estimates, each with its own interval
    (l_k, u_k): MOVER, the method of variance estimates recovery (Zou & Donner 2008; Newcombe 2011),
    (θ̄ − sqrt(Σ (θ_k − l_k)²) / K, θ̄ + sqrt(Σ (u_k − θ_k)²) / K). Each interval gives its own variance below and
    above the estimate, so skewed intervals near 0 or 1 stay skewed; for K = 1 it is the interval itself."""
    K = len(estimates)
    mean = sum(estimates) / K
    below = math.sqrt(sum((t - lo) ** 2 for t, (lo, _) in zip(estimates, intervals))) / K
    above = math.sqrt(sum((hi - t) ** 2 for t, (_, hi) in zip(estimates, intervals))) / K
    return mean - below, mean + above


def paired_difference_interval(both, only_a, only_b, neither, z=Z95):
    """95% interval for p_A − p_B, two proportions measured on the same n items (a paired 2 × 2 table: both
    correct, only A, only B, neither): Newcombe's hybrid score interval, method 10 of Newcombe (1998), "Improved
    confidence intervals for the difference between binomial proportions based on paired data", Stat. Med. 17,
    2635-2650. It combines the Wilson intervals (l_1, u_1), (l_2, u_2) of p_A and p_B with the correlation of the
    pairs, φ = (AD − BC)/sqrt((A+B)(C+D)(A+C)(B+D)), with AD − BC reduced by n/2 (not below 0) when positive:
        lower = Δ − sqrt((p_A − l_1)² − 2φ(p_A − l_1)(u_2 − p_B) + (u_2 − p_B)²)
        upper = Δ + sqrt((u_1 − p_A)² − 2φ(u_1 − p_A)(p_B − l_2) + (p_B − l_2)²)
    Returns (Δ, lower, upper) as fractions. It needs no iteration, never leaves [−1, 1], and is not degenerate when
    no pair is discordant (the Wald interval then has width 0)."""
    n = both + only_a + only_b + neither
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_a, n, z), wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    ad_bc = both * neither - only_a * only_b
    if ad_bc > 0:
        ad_bc = max(ad_bc - n / 2, 0)
    phi = ad_bc / math.sqrt(margins) if margins > 0 else 0.0
    lower = math.sqrt(max(0.0, (p_a - l1) ** 2 - 2 * phi * (p_a - l1) * (u2 - p_b) + (u2 - p_b) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p_a) ** 2 - 2 * phi * (u1 - p_a) * (p_b - l2) + (p_b - l2) ** 2))
    return p_a - p_b, p_a - p_b - lower, p_a - p_b + upper


CI_METHOD = ("per dataset, the Wilson score interval of the accuracy (a binomial proportion of n images); the average, "
             "the MOVER interval of the unweighted mean of the datasets' accuracies (Zou & Donner 2008). Both cover "
             "the sampling of the test images only, not retraining or the attack's random start")
PAIRED_METHOD = ("Newcombe's hybrid score interval for the difference of paired proportions (Newcombe 1998, method "
                 "10) per dataset; the average, the MOVER interval of the mean of the datasets' differences")


# ------------------------------------------------------------------------------ per-image results, resume
# Settings that fix what each image's result is: a rerun continues an evaluation only if they are all equal. The
# others may change: the number of processes and --workers change nothing; --batch-size, --compile, --attack-all and
# --no-early-exit (which batch the attacked images differently) can change float rounding only, so a rerun that keeps
# them gives the uninterrupted run's numbers bit for bit.
IDENTITY = {"model_sha256": "--model (its weights)", "reference_sha256": "--reference-model (its weights)",
            "datasets": "--datasets", "images": "the images (--samples, or the data changed)",
            "prompts_sha256": "the class prompts (--template, --class-names)", "attacks": "--attacks",
            "eps": "--eps", "alpha": "--alpha", "steps": "--steps", "samples": "--samples", "seed": "--seed",
            "amp": "--amp", "metrics": "--metrics", "stable_ce": "--stable-ce",
            "defense": "--defense and its settings"}
# Settings that fix the images and the attacks: --compare pairs two evaluations only if they are all equal.
PAIRED = {"datasets": "--datasets", "images": "the images (--samples, or the data changed)", "samples": "--samples",
          "seed": "--seed", "attacks": "--attacks", "eps": "--eps", "alpha": "--alpha", "steps": "--steps",
          "defense": "--defense and its settings"}
SAMPLES_FORMAT = "clip-aft-eval-samples/1"


def weights_sha256(model):
    """sha256 of a model's weights (names, dtypes, shapes and values in state-dict order): identifies the evaluated
    model whatever file or name it came from, and tells a rerun whether the weights are still the same."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def is_bit_field(field):
    """Correctness fields (clean, each attack) are bits; "label" is an integer, "<metric>.<kind>" a float32."""
    return field != "label" and "." not in field


def differences(here, there, keys, names=("here", "there")):
    """The settings in `keys` that differ between two settings dicts, each as 'flag: value here, value there'."""
    show = lambda v: (json.dumps(v) if not isinstance(v, str) else v)[:60]  # noqa: E731
    return [f"{flag}: {show(here.get(k))} {names[0]}, {show(there.get(k))} {names[1]}" for k, flag in keys.items()
            if here.get(k) != there.get(k)]


class SampleStore:
    """Per-image results of every dataset (rank 0): the --per-sample file, which is also the state a rerun continues
    from. An image's results depend only on its index and its batch, and common.eval_loader puts it in the same batch
    whatever the number of processes, so a rerun (with any number of processes) evaluates the images still to do
    exactly as an uninterrupted run would have. An .npz read with allow_pickle=False: "meta" (JSON: format,
    settings, per dataset its name, image count, fields and whether it is complete) and per dataset k: "k.index"
    (int64, the image's index in the dataset), "k.done", "k.clean" and "k.<attack>" (np.packbits of booleans, one
    bit per image), "k.label" (int64), "k.<metric>.clean" / "k.<metric>.adv" (float32). Written atomically (temp
    file, fsync, rename)."""

    def __init__(self, path, settings):
        self.path, self.settings, self.sets = path, settings, {}
        self.lock = None  # the lock on --out (common.hold_lock), held while this run lives
        self.saved_at = time.time()

    @staticmethod
    def read(path):
        """(settings, {name: {"n", "index", "fields", "complete", "done", "values"}}) of a per-sample file."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != SAMPLES_FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {SAMPLES_FORMAT}")
                sets = {}
                for k, d in enumerate(meta["datasets"]):
                    n = d["n"]
                    unpack = lambda a: np.unpackbits(a, count=n).astype(bool)  # noqa: E731
                    sets[d["name"]] = {"n": n, "fields": d["fields"], "complete": d["complete"],
                                       "resumed": d.get("resumed", []),
                                       "index": z[f"{k}.index"], "done": unpack(z[f"{k}.done"]),
                                       "values": {f: unpack(z[f"{k}.{f}"]) if is_bit_field(f) else z[f"{k}.{f}"]
                                                  for f in d["fields"]}}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise common.UsageError(f"--per-sample {path}: unreadable per-sample file ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); move it away to start afresh")
        return meta["settings"], sets

    def begin(self, name, index, fields):
        """Start (or continue) a dataset: `index` the dataset indices of its n images. Returns its done mask."""
        n = len(index)
        if name not in self.sets:
            self.sets[name] = {"n": n, "fields": fields, "complete": False, "resumed": [],
                               "index": np.asarray(index, np.int64), "done": np.zeros(n, bool),
                               "values": {f: np.zeros(n, bool) if is_bit_field(f) else
                                          np.zeros(n, np.int64) if f == "label" else np.full(n, np.nan, np.float32)
                                          for f in fields}}
        d = self.sets[name]
        if d["fields"] != fields or not np.array_equal(d["index"], index):  # the settings matched: a changed dataset
            raise common.UsageError(f"--per-sample {self.path}: its images of {name} are not this dataset's; move it "
                                    "away to start afresh")
        if 0 < d["done"].sum() < n and not d["resumed"][-1:] == [int(d["done"].sum())]:
            d["resumed"].append(int(d["done"].sum()))  # images done when this run took over
        return d["done"]

    def record(self, name, rows):
        """rows: (b, 1 + F) float64, the image's position in the dataset, then the fields in order."""
        d = self.sets[name]
        position = rows[:, 0].astype(np.int64)
        d["done"][position] = True
        for j, f in enumerate(d["fields"], start=1):
            d["values"][f][position] = rows[:, j]

    def save(self):
        meta = {"format": SAMPLES_FORMAT, "settings": self.settings,
                "datasets": [{"name": name, "n": d["n"], "fields": d["fields"], "complete": d["complete"],
                              "resumed": d["resumed"]} for name, d in self.sets.items()]}
        arrays = {"meta": np.array(json.dumps(meta))}
        for k, d in enumerate(self.sets.values()):
            arrays[f"{k}.index"], arrays[f"{k}.done"] = d["index"], np.packbits(d["done"])
            for f, v in d["values"].items():
                arrays[f"{k}.{f}"] = np.packbits(v) if is_bit_field(f) else v
        common.atomic_write(self.path, lambda f: np.savez(f, **arrays))  # a file object: savez adds no .npz
        self.saved_at = time.time()


def open_store(args, settings):
    """Rank 0: the SampleStore this run writes, holding what an earlier run of the same evaluation left in
    --per-sample, and the img_per_s of its finished datasets, with the lock on --out (<out>.lock) held. A different
    evaluation in --out or --per-sample, or one still running there, stops with one line; nothing else is written
    here."""
    store, there, previous_speed = SampleStore(args.per_sample, settings), None, {}
    # one evaluation at a time per --out: a second one stops here, before it reads the other's partial results
    with common.writing(args.out):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        store.lock = common.hold_lock(args.out + ".lock", f"--out {args.out}")
    fresh = "; rerun with its settings to continue it, or use another --out (or delete {}) to start afresh"
    if os.path.exists(args.out):
        try:
            with open(args.out) as f:
                old = json.load(f)
            there, old_samples = old["settings"], old["per_sample"]["file"]
        except (OSError, ValueError, KeyError, TypeError):
            raise common.UsageError(f"--out {args.out}: exists and is not a results file of this evaluate.py (no "
                                    "settings or per-sample record); move it away or use another --out")
        old_samples = os.path.join(os.path.dirname(os.path.abspath(args.out)), old_samples)
        if os.path.abspath(old_samples) != os.path.abspath(args.per_sample):
            raise common.UsageError(f"--per-sample {args.per_sample}: the results in {args.out} keep their per-image "
                                    f"results in {old_samples}; give --per-sample {old_samples} to continue, or use "
                                    "another --out to start afresh")
        diffs = differences(settings, there, IDENTITY)
        if diffs:
            raise common.UsageError(f"--out {args.out}: holds an evaluation with other settings: {'; '.join(diffs)}"
                                    + fresh.format(f"{args.out} and {args.per_sample}"))
        previous_speed = old.get("img_per_s", {})
    if os.path.exists(args.per_sample):
        there, sets = SampleStore.read(args.per_sample)
        diffs = differences(settings, there, IDENTITY)
        if diffs:
            raise common.UsageError(f"--per-sample {args.per_sample}: holds an evaluation with other settings: "
                                    f"{'; '.join(diffs)}" + fresh.format(args.per_sample))
        store.sets = sets
    return store, {k: v for k, v in previous_speed.items() if k in store.sets and store.sets[k]["complete"]}


def pack_rows(index, out, fields):
    """One batch's per-image results as (b, 1 + F) float64 rows: position, then each field (exact: bits, labels,
    float32 metrics all fit a float64)."""
    rows = torch.zeros(len(index), 1 + len(fields), dtype=torch.float64)
    rows[:, 0] = index
    for j, f in enumerate(fields, start=1):
        if len(index):
            rows[:, j] = out[f].double()
    return rows


def gather_rows(rows, dist):
    """Every rank's rows (their count may differ by rank), concatenated, on the host group (Dist.cpu_group)."""
    if dist.world == 1:
        return rows.numpy()
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(dist.world)]
    torch_dist.all_gather(counts, torch.tensor([len(rows)]), group=dist.cpu_group)
    padded = torch.zeros(max(int(c) for c in counts), rows.shape[1], dtype=torch.float64)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    torch_dist.all_gather(parts, padded, group=dist.cpu_group)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)]).numpy()


def dataset_indices(dataset):
    """The dataset index of each evaluated image (a --samples subset keeps its original indices)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return list(dataset.indices)
    return list(range(len(dataset)))


# ------------------------------------------------------------------------------------------------ reports
def summarize_dataset(d, columns, metrics):
    """Accuracy (%), correct count and 95% Wilson interval (%) per column, and the mean of each structure metric,
    from a dataset's per-image results. None where a column or metric does not apply."""
    n, values = d["n"], d["values"]
    counts = {c: int(values[c].sum()) if c in values else None for c in columns}
    acc = {c: None if k is None else round(100.0 * k / max(n, 1), 2) for c, k in counts.items()}
    ci = {}
    for c, k in counts.items():
        interval = wilson_interval(k, n) if k is not None else None
        ci[c] = None if interval is None else [round(100 * interval[0], 2), round(100 * interval[1], 2)]
    mean = {m: {which: round(float(values[f"{m}.{which}"].astype(np.float64).mean()), 2)
                for which in ("clean", "adv") if f"{m}.{which}" in values} for m in metrics}
    return {"n": n, **acc}, counts, ci, mean


def build_report(args, settings, store, class_counts, throughput):
    """The results JSON of the datasets finished so far (marked complete once all are) and its Markdown."""
    columns = ["clean", *args.attacks, *args.defense_columns]
    names = [name for name in settings["datasets"] if name in store.sets and store.sets[name]["complete"]]
    results, counts, ci, metric_means = {}, {}, {}, {}
    for name in names:
        results[name], counts[name], ci[name], metric_means[name] = summarize_dataset(store.sets[name], columns,
                                                                                      args.metrics)
    mean, notes = summarize(results, columns)
    mean_ci = {}
    for c in columns:
        have = [name for name in names if counts[name][c] is not None and results[name]["n"] > 0]
        if have:
            lo, hi = mover_mean([counts[n_][c] / results[n_]["n"] for n_ in have],
                                [wilson_interval(counts[n_][c], results[n_]["n"]) for n_ in have])
            mean_ci[c] = [round(100 * max(lo, 0.0), 2), round(100 * min(hi, 1.0), 2)]
        else:
            mean_ci[c] = None
    if "aa" in args.attacks:
        notes += [f"aa on {name} ({class_counts[name]} classes) is APGD-CE alone: DLR needs at least 3 classes"
                  for name in names if class_counts[name] < 3]
    if "aa-ce-t" in args.attacks:
        notes += [f"aa-ce-t on {name} ({class_counts[name]} classes) is APGD-CE alone: APGD-T needs at least 4 "
                  "classes" for name in names if class_counts[name] < 4]
    if args.protocol:
        notes.insert(0, f"protocol {args.protocol}: {PROTOCOLS[args.protocol]['about']}")
    complete = len(names) == len(settings["datasets"])
    report = {"complete": complete, "datasets": results, "mean": mean,
              "correct": counts, "ci95": {"method": CI_METHOD, "datasets": ci, "mean": mean_ci}}
    if args.metrics:
        first = args.attacks[0] if args.attacks else None
        over = ("×100, φ in degrees; mean over every image of each dataset"
                + (f"; adversarial: x_adv of the first attack, {first}, run on every image for this (also those "
                   "misclassified clean)" if first else "")
                + (f"; top-5 IoU with the clean top-5 of {args.reference_model}" if "top5-iou" in args.metrics else ""))
        metric_mean = {}  # unweighted over the datasets where the metric applies, like the accuracies
        for m in args.metrics:
            metric_mean[m] = {}
            for which in ("clean", "adv"):
                v = [metric_means[name][m][which] for name in names if which in metric_means[name][m]]
                if v:
                    metric_mean[m][which] = round(sum(v) / len(v), 2)
        report["metrics"] = {"over": over, "reference_model": args.reference_model, "datasets": metric_means,
                             "mean": metric_mean}
        notes += [f"top5-iou is not applicable to {name} ({class_counts[name]} classes: every top-5 set would be "
                  "all classes)" for name in names if "top5-iou" in args.metrics and class_counts[name] <= 5]
    if args.defense:
        report["defense"], defense_notes = defense_report(args, store, names, results)
        notes += defense_notes
    report["per_sample"] = {"file": None, "sha256": None, "format": SAMPLES_FORMAT}
    report["settings"] = settings
    report["img_per_s"] = {name: throughput[name] for name in names if name in throughput}
    notes += [f"{name}: continued after an interruption with {', '.join(map(str, store.sets[name]['resumed']))} of "
              f"{results[name]['n']} images evaluated (same settings; each image's result depends only on its index)"
              for name in names if store.sets[name]["resumed"]]
    report["notes"] = list(dict.fromkeys(notes))

    steps = settings["steps"]
    labels = {"clean": "clean", **{a: ATTACK_LABELS[a].format(n=steps[a]) for a in args.attacks}}
    if args.defense:
        labels["clean@defended"] = f"clean, {args.defense}"
        if args.sanity_eps:
            labels.update({"sanity": f"PGD-20 at ε = {args.sanity_eps:g}/255",
                           "sanity@adaptive": f"PGD-20 at ε = {args.sanity_eps:g}/255, {args.defense}, adaptive"})
        labels.update({f"{a}@{m}": f"{labels[a]}, {args.defense}, {m}" for a in args.attacks for m in args.attack_mode})
    title = (f"Zero-shot accuracy (%) of {args.model}, ℓ∞ ε = {args.eps:g}/255"
             + (f", protocol {args.protocol}" if args.protocol else "")
             + (f", α = {args.alpha:g}/255" if set(args.attacks) & STEP_SIZE_ATTACKS else "")
             + (", cross-entropy without cancellation (--stable-ce)" if args.stable_ce else "")
             + (f"; behind {args.defense} ({', '.join(f'{k} {v:g}' for k, v in args.defense_settings.items())}; "
                f"modes {', '.join(args.attack_mode)}; EOT {args.eot}, {args.defense_draws} draw(s))"
                if args.defense else "")
             + (f", {args.samples} images per dataset at most" if args.samples else "")
             + ("" if complete else f" (incomplete: {len(names)} of {len(settings['datasets'])} datasets)"))
    table = markdown_table(results, mean, columns, labels, title, report["ci95"] if args.intervals else None)
    if args.metrics:
        table += "\n" + metrics_table(args.metrics, report["metrics"], labels[args.attacks[0]] if args.attacks
                                       else "")
    if args.defense:  # the threat model, the masking checks on average, and any "gradient masking suspected"
        checks = ", ".join(f"{k} {v:.4g}" for k, v in report["defense"]["diagnostics"]["mean"].items())
        firsts = {}  # (attack, mode) -> variant -> images it broke first, summed over the datasets
        for per_column in report["defense"]["broken_by"].values():
            for column, counts in per_column.items():
                for variant, k in counts.items():
                    firsts.setdefault(column, {}).setdefault(variant, 0)
                    firsts[column][variant] += k
        broke = "; ".join(f"{c}: " + ", ".join(f"{v} {k}" for v, k in counts.items()) for c, counts in firsts.items())
        table += (f"\nThreat model: {THREAT_MODEL}.\n\nChecks for gradient masking (mean over the datasets): {checks}"
                  + (f"\n\nImages each adaptive variant broke first (all datasets): {broke}" if broke else "")
                  + "\n" + "".join(f"\n{n}" for n in report["notes"] if n.startswith("gradient masking")))
    return report, table


def defense_report(args, store, names, results):
    """The report's "defense" entry: the defence and its settings, the threat model, per dataset and on average the
    mean of each diagnostic (defended_results) over the images where it was computed; and the notes: a large-ε
    check that left accuracy far from 0 (more than 10%) says gradient masking is suspected."""
    means = {}
    for name in names:
        values = store.sets[name]["values"]
        means[name] = {f[len("defense."):]: float(f"{np.nanmean(values[f].astype(np.float64)):.4g}")
                       for f in values if f.startswith("defense.") and not f.startswith("defense.broken_by.")
                       and np.isfinite(values[f]).any()}
    keys = sorted({k for m in means.values() for k in m})
    mean = {k: float(f"{np.mean([means[n][k] for n in names if k in means[n]]):.4g}") for k in keys}
    notes = []
    for name in names:
        for column in ("sanity", "sanity@adaptive"):
            acc = results[name].get(column)
            if acc is not None and acc > 10:
                who = "the undefended model" if column == "sanity" else args.defense
                notes.append(f"gradient masking suspected: {who} keeps {acc:.2f}% accuracy on {name} under PGD-20 at "
                             f"ε = {args.sanity_eps:g}/255 (an attack that sees a true gradient brings it near 0)")
    broken = {}  # the adaptive variants: how many images each one broke first, per dataset and (attack, mode)
    for name in names:
        values = store.sets[name]["values"]
        for f in (f for f in values if f.startswith("defense.broken_by.")):
            column = f[len("defense.broken_by."):]
            variants = mode_variants(args.defense, column.split("@")[1], args.square_queries)
            broken.setdefault(name, {})[column] = {
                (view or kind): int((values[f] == j).sum()) for j, (kind, view) in enumerate(variants, start=1)}
    return {"name": args.defense, "settings": args.defense_settings, "attack_modes": args.attack_mode,
            "threat_model": THREAT_MODEL, "diagnostics": {"datasets": means, "mean": mean},
            "broken_by": broken}, notes


def write_report(args, report, table):
    """The per-sample file is already saved: record its name and sha256, then write --out and the table beside it,
    each atomically."""
    folder = os.path.dirname(os.path.abspath(args.out))
    relative = os.path.relpath(os.path.abspath(args.per_sample), folder)
    report["per_sample"]["file"] = os.path.abspath(args.per_sample) if relative.startswith("..") else relative
    report["per_sample"]["sha256"] = common.file_sha256(args.per_sample)
    common.write_json(report, args.out)
    md = os.path.splitext(args.out)[0] + ".md"
    common.atomic_write(md, lambda f: f.write(table), mode="w")


# --------------------------------------------------------------------------------------------------- compare
def read_evaluation(path):
    """A finished results JSON and its per-image results, checked to belong together."""
    if not os.path.isfile(path):
        raise common.UsageError(f"--compare {path}: no such file")
    try:
        with open(path) as f:
            report = json.load(f)
        record, settings = report["per_sample"], report["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise common.UsageError(f"--compare {path}: not a results file of this evaluate.py ({type(e).__name__})")
    if not report.get("complete"):
        raise common.UsageError(f"--compare {path}: the evaluation is incomplete (rerun its command to finish it)")
    samples = os.path.join(os.path.dirname(os.path.abspath(path)), record["file"])
    if not os.path.isfile(samples):
        raise common.UsageError(f"--compare {path}: its per-sample file {samples} is missing")
    if common.file_sha256(samples) != record["sha256"]:
        raise common.UsageError(f"--compare {path}: {samples} is not the per-sample file written with it (sha256 "
                                "differs)")
    there, sets = SampleStore.read(samples)
    wrong = differences(settings, there, IDENTITY) or [
        name for name, counts in report["correct"].items()
        if any(k is not None and int(sets[name]["values"][c].sum()) != k for c, k in counts.items())]
    if wrong:
        raise common.UsageError(f"--compare {path}: {samples} does not hold its per-image results ({wrong[0]})")
    return report, sets


def compare(path_a, path_b):
    """A − B per dataset and setting (clean, each attack) and on average, with paired 95% intervals (Markdown)."""
    (ra, sa), (rb, sb) = read_evaluation(path_a), read_evaluation(path_b)
    diffs = differences(ra["settings"], rb["settings"], PAIRED, ("in A", "in B"))
    if diffs:
        raise common.UsageError(f"--compare: {path_a} and {path_b} are not evaluations of the same images under the "
                                f"same attacks: {'; '.join(diffs)}")
    for name in ra["settings"]["datasets"]:
        for key in ("index", "label"):
            here = sa[name]["index"] if key == "index" else sa[name]["values"]["label"]
            there = sb[name]["index"] if key == "index" else sb[name]["values"]["label"]
            if not np.array_equal(here, there):
                raise common.UsageError(f"--compare: the images of {name} differ between {path_a} and {path_b} "
                                        f"(their {'dataset indices' if key == 'index' else 'labels'})")
    steps = ra["settings"]["steps"]
    labels = {"clean": "clean", **{a: ATTACK_LABELS[a].format(n=steps[a]) for a in ra["settings"]["attacks"]}}
    lines = [f"A: {path_a} ({ra['settings']['model']})", f"B: {path_b} ({rb['settings']['model']})",
             f"A − B in accuracy points, 95% interval: {PAIRED_METHOD}. The same images and attacks "
             f"(ε = {ra['settings']['eps']:g}/255).", "",
             "| setting | dataset | images | A | B | A − B | 95% interval | only A correct | only B correct |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    fmt = lambda v: f"{100 * v:+.2f}"  # noqa: E731
    for c in ["clean", *ra["settings"]["attacks"]]:
        estimates, intervals, acc_a, acc_b = [], [], [], []
        for name in ra["settings"]["datasets"]:
            if c not in sa[name]["values"]:
                lines.append(f"| {labels[c]} | {name} | {sa[name]['n']} | n/a | n/a | n/a | | | |")
                continue
            x, y = sa[name]["values"][c], sb[name]["values"][c]
            table = [int((x & y).sum()), int((x & ~y).sum()), int((~x & y).sum()), int((~x & ~y).sum())]
            d, lo, hi = paired_difference_interval(*table)
            estimates.append(d), intervals.append((lo, hi)), acc_a.append(x.mean()), acc_b.append(y.mean())
            lines.append(f"| {labels[c]} | {name} | {len(x)} | {100 * x.mean():.2f} | {100 * y.mean():.2f} | "
                         f"{fmt(d)} | [{fmt(lo)}, {fmt(hi)}] | {table[1]} | {table[2]} |")
        if len(ra["settings"]["datasets"]) > 1 and estimates:
            lo, hi = mover_mean(estimates, intervals)
            lines.append(f"| {labels[c]} | **Average** ({len(estimates)}) | | {100 * np.mean(acc_a):.2f} | "
                         f"{100 * np.mean(acc_b):.2f} | {fmt(np.mean(estimates))} | [{fmt(lo)}, {fmt(hi)}] | | |")
    other = {"amp": "--amp", "prompts_sha256": "the class prompts", "stable_ce": "--stable-ce"}  # may differ: said
    notes = [f"note: {d}" for d in differences(ra["settings"], rb["settings"], other, ("in A", "in B"))]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# ------------------------------------------------------------------------------------ embeddings (--save-features)
FEATURES_FORMAT = "clip-aft-features/1"


def save_features(args, encoder, sets, text_of, dist, ctx):
    """--save-features: every evaluated image's raw embedding f(x), clean and at the first attack's x_adv (run on
    every image), with its label and whether it is classified correctly, gathered on rank 0 and written atomically
    to an .npz read with allow_pickle=False: "meta" (JSON: format, model, attack, eps, steps, per dataset its name
    and class names) and per dataset k: "k.index", "k.label" (int64), "k.correct.clean", "k.correct.adv" (bool),
    "k.clean", "k.adv" ((n, D) float32; "adv" and "correct.adv" absent when no attack applies). One pass, no resume:
    a preempted run is rerun whole."""
    attack = args.attacks[:1]
    meta = {"format": FEATURES_FORMAT, "model": args.model, "vision_weights": args.vision_weights,
            "attack": attack[0] if attack else None, "eps": args.eps, "alpha": args.alpha,
            "steps": args.steps.get(attack[0]) if attack else None, "samples": args.samples, "seed": args.seed,
            "stable_ce": args.stable_ce, "datasets": []}
    arrays = {}
    for k, (name, dataset, class_names, _, _) in enumerate(sets):
        text = text_of(name)  # (C, D)
        fields = sample_fields(attack, (), len(class_names))  # label, clean, and the attack where it applies
        adv = len(fields) == 3
        embeddings = ["embedding.clean", *(["embedding.adv"] if adv else [])]
        width, dim = 1 + len(fields) + len(embeddings) * text.shape[1], text.shape[1]
        rows = []
        for index, out in zero_shot_samples(encoder, text, dataset, dist, tuple(attack), args.eps / 255,
                                            args.alpha / 255, args.steps, args.batch_size, ctx, args.seed,
                                            args.workers, desc=name, embeddings=True):
            error = common.first_error(out.pop("error", None), dist)  # an unreadable image on any rank stops all
            if error is not None:
                raise common.UsageError(f"{name}: {error}")
            if common.SIGNALS.requested(dist):  # a signal on any rank: every rank stops after the same batch
                raise common.SIGNALS.stop(f"while computing {args.save_features}, before writing it")
            out.pop("stopped", None)
            batch = torch.zeros(len(index), width, dtype=torch.float64)  # position, fields, the embeddings
            if len(index):
                batch[:, 0] = index
                batch[:, 1:1 + len(fields)] = torch.stack([out[f].double() for f in fields], dim=1)
                batch[:, 1 + len(fields):] = torch.cat([out[e].double() for e in embeddings], dim=1)
            rows.append(gather_rows(batch, dist))
        if not dist.is_main:
            continue
        rows = np.concatenate(rows) if rows else np.zeros((0, width))
        rows = rows[np.argsort(rows[:, 0], kind="stable")]  # dataset order, whatever the process count
        at, index = 1 + len(fields), np.asarray(dataset_indices(dataset), np.int64)  # position -> dataset index
        arrays.update({f"{k}.index": index[rows[:, 0].astype(np.int64)], f"{k}.label": rows[:, 1].astype(np.int64),
                       f"{k}.correct.clean": rows[:, 2].astype(bool), f"{k}.clean": rows[:, at:at + dim].astype(
                           np.float32)})
        if adv:
            arrays[f"{k}.correct.adv"] = rows[:, 3].astype(bool)
            arrays[f"{k}.adv"] = rows[:, at + dim:].astype(np.float32)
        meta["datasets"].append({"name": name, "n": len(rows), "classes": list(class_names), "adv": adv})
    if dist.is_main:
        arrays["meta"] = np.array(json.dumps(meta))
        common.atomic_write(args.save_features, lambda f: np.savez(f, **arrays))
        print(f"wrote {args.save_features}: the embeddings of {sum(d['n'] for d in meta['datasets'])} images, clean"
              + (f" and at {attack[0]} (ε = {args.eps:g}/255)" if attack else ""), flush=True)


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        print(compare(*args.compare), flush=True)
        return
    token = common.STABLE_CE.set(args.stable_ce)  # the attacks' cross-entropy (--stable-ce)
    try:
        with early_exit(not args.no_early_exit):
            evaluate(args, common.SIGNALS)  # the process's signals (installed by common.run_main)
    finally:
        common.STABLE_CE.reset(token)


def evaluate(args, preemption):
    eps, alpha = args.eps / 255, args.alpha / 255
    dist = common.setup_distributed()
    amp, ctx, _ = common.amp_setup(args.amp, dist.device)
    model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    model = model.requires_grad_(False).eval()  # no param grads
    model_sha = weights_sha256(model)
    model = model.to(dist.device)
    reference, reference_sha = None, None  # top5-iou's and TTC's reference model; None: the evaluated model itself
    if args.reference_model is not None:
        reference = common.load_clip(args.reference_model, args.seed, dist=dist).requires_grad_(False).eval()
        reference_sha = weights_sha256(reference)
        reference = None if reference_sha == model_sha else reference.to(dist.device)
    protocol_templates = PROTOCOLS[args.protocol].get("templates", {}) if args.protocol else {}
    sets = [(name, fixed_subset(ds, args.samples, args.seed), class_names,
             args.template or protocol_templates.get(name, template), len(ds))  # --template, the protocol's, the tsv's
            for name, ds, class_names, template in load_datasets(args, dist, model.visual.input_resolution)]
    encoder = common.compile_encoder(common.ImageEncoder(model.visual).to(dist.device).eval(), args.compile)
    ref_encoder = None if reference is None else common.ImageEncoder(reference.visual).to(dist.device).eval()
    steps = args.steps  # {attack: iterations}
    prompts = {name: common.prompts_for(class_names, template) for name, _, class_names, template, _ in sets}
    if args.save_features:  # a run of its own: the embeddings, no accuracies
        save_features(args, encoder, sets, lambda name: common.text_features(model, prompts[name], dist.device), dist,
                      ctx)
        common.cleanup_distributed()
        return
    settings = {"protocol": args.protocol, "model": args.model, "vision_weights": args.vision_weights,
                "model_sha256": model_sha, "datasets": [s[0] for s in sets],
                "images": {name: [full, len(ds)] for name, ds, _, _, full in sets},  # [dataset size, evaluated]
                "attacks": args.attacks, "eps": args.eps, "alpha": args.alpha, "steps": steps,
                "samples": args.samples, "seed": args.seed, "amp": amp, "metrics": args.metrics,
                "reference_model": args.reference_model, "reference_sha256": reference_sha,
                "defense": None if args.defense is None else {
                    "name": args.defense, **args.defense_settings, "attack_modes": args.attack_mode, "eot": args.eot,
                    "draws": args.defense_draws, "square_queries": args.square_queries,
                    "sanity_eps": args.sanity_eps},
                "processes": dist.world, "batch_size": args.batch_size, "compile": args.compile,
                "attack_all": args.attack_all, "early_exit": not args.no_early_exit,
                "device": device_name(dist.device),
                **({"stable_ce": True} if args.stable_ce else {}),  # absent: the reference CE (older results too)
                "templates": {name: template for name, _, _, template, _ in sets},
                "prompts_sha256": {name: hashlib.sha256("\n".join(p).encode()).hexdigest()
                                   for name, p in prompts.items()}}
    settings = json.loads(json.dumps(settings))  # as a rerun reads it back
    log = print if dist.is_main else (lambda *a, **k: None)

    store, throughput, error = None, {}, None
    if dist.is_main:  # what an earlier run of the same evaluation left; a different one stops here, nothing written
        try:
            store, throughput = open_store(args, settings)
        except common.UsageError as e:
            error = e
    common.raise_on_every_rank(error, dist)
    log(f"evaluating {args.model} on {len(sets)} dataset(s), ε = {args.eps:g}/255, attacks: "
        f"{', '.join(f'{a} ({steps[a]} steps)' for a in args.attacks) or 'none'}, metrics: "
        f"{', '.join(args.metrics) or 'none'}; {dist.world} process(es), {dist.device}, amp {amp}", flush=True)

    class_counts = {name: len(c) for name, _, c, _, _ in sets}
    preemption.defer()  # from here on a signal is honoured after the batch in hand, whose attacks it interrupts
    try:
        for k, (name, dataset, class_names, template, _) in enumerate(sets):
            defense = None
            if args.defense:
                null_text = common.text_features(model, [template.replace("{}", "").replace("  ", " ")],
                                                 dist.device)[0]  # CLIPure's null template: no class name
                zs = defenses.Zeroshot(encoder, common.text_features(model, prompts[name], dist.device), ref_encoder,
                                       null_text)
                defense = DefenseRun(defenses.build_defense(args.defense, zs, args.seed, **args.defense_settings),
                                     tuple(args.attack_mode), args.eot, args.defense_draws, args.square_queries,
                                     args.sanity_eps)
            fields = sample_fields(args.attacks, args.metrics, len(class_names), defense)
            done, error = torch.zeros(len(dataset), dtype=torch.uint8), None
            if dist.is_main:
                try:
                    done = torch.from_numpy(store.begin(name, dataset_indices(dataset), fields).astype(np.uint8))
                except common.UsageError as e:
                    error = e
            common.raise_on_every_rank(error, dist)
            if dist.world > 1:  # rank 0 alone reads the state; every rank needs to know which images are left
                torch_dist.broadcast(done, 0, group=dist.cpu_group)
            todo = (done == 0).nonzero()[:, 0].tolist()
            if todo and len(todo) < len(dataset):
                log(f"{name}: continuing, {len(dataset) - len(todo)} of {len(dataset)} images already evaluated "
                    f"({args.per_sample})", flush=True)
            elif not todo:
                log(f"{name}: already evaluated ({args.per_sample})", flush=True)
            if todo:
                t0, timing = time.time(), {}
                text = common.text_features(model, prompts[name], dist.device)  # (C, D), once per dataset
                ref_logits = None
                if ref_encoder is not None and "top5-iou" in args.metrics:
                    ref_text = common.text_features(reference, prompts[name], dist.device)  # the reference's prompts
                    ref_logits = lambda x: (common.CLIP_LOGIT_SCALE  # noqa: E731
                                            * common.cosine_sim(ref_encoder(x), ref_text))
                for index, out in zero_shot_samples(
                        encoder, text, dataset, dist, tuple(args.attacks), eps, alpha, steps, args.batch_size, ctx,
                        args.seed, args.workers, desc=name, timing=timing, attack_all=args.attack_all,
                        metrics=tuple(args.metrics), reference=ref_logits, indices=todo, defense=defense):
                    error = out.pop("error", None)
                    out.pop("stopped", None)  # a batch a signal interrupted: no rows; requested() stops every rank
                    rows = gather_rows(pack_rows(index, out, fields), dist)
                    if dist.is_main:
                        store.record(name, rows)
                    error = common.first_error(error, dist)  # an unreadable image on any rank: save what is done, stop
                    if error is not None:
                        if dist.is_main:
                            store.save()
                        raise common.UsageError(f"{name}: {error}")
                    if preemption.requested(dist):  # every rank stops after the same batch
                        what = "interrupted" if preemption.status == common.INTERRUPTED else "preempted"
                        message = f"{what} ({preemption.received or 'signal on another rank'})"
                        if dist.is_main:
                            store.save()
                            message += (f": the per-image results of {int(store.sets[name]['done'].sum())} of "
                                        f"{len(dataset)} images of {name}"
                                        + (" and of every earlier dataset" if k else "")
                                        + f" are saved in {args.per_sample}; rerun the same command to continue "
                                        f"(exit status {preemption.status})")
                        raise common.Preempted(message, preemption.status)
                    if dist.is_main and time.time() - store.saved_at >= args.save_every:
                        store.save()
                throughput[name] = timing
            if dist.is_main:
                store.sets[name]["complete"] = True
                store.save()
                report, table = build_report(args, settings, store, class_counts, throughput)
                write_report(args, report, table)
                if todo:
                    r = report["datasets"][name]
                    log(f"{name}: {len(class_names)} classes, {r}  ({time.time() - t0:.0f}s; images/s "
                        f"{throughput[name]})", flush=True)
    except BaseException as e:  # a lost worker or process, a bug: keep every batch evaluated so far
        if dist.is_main and not isinstance(e, (common.Preempted, common.UsageError)):  # those saved (or failed to)
            with contextlib.suppress(Exception):  # (the error in hand is the one to report)
                store.save()
        raise
    preemption.defer(False)
    if dist.is_main:
        print("\n" + table, flush=True)
        print(f"wrote {args.out}, {os.path.splitext(args.out)[0] + '.md'} and {args.per_sample}", flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
