"""Zero-shot clean and robust accuracy of any CLIP model on the benchmark datasets (SPEC §6).

Zero-shot classifier: one prompt template per dataset (data_lists/templates.tsv), class names refined (`_`/`-` ->
space, lower case), text features computed once per dataset, logits 100 · s(f(x), T). A sample counts as robust to
an attack only if it is classified correctly clean and at x_adv. Every sample is counted once, with any number of
processes; random starts and random targets depend only on the sample's index.

Attacks (ℓ∞, --eps in units of 1/255; common.ATTACKS):
    pgd          PGD, 20 steps, α = 1/255, cross-entropy at CLIP's scale 100 (the AGFT protocol)
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
    square       Square Attack, 5000 queries (--steps), margin loss, gradient-free: a check for gradient masking

Reproduce the AGFT paper's evaluation rows (ViT-B/32, ε = 1/255, the 15 datasets; Tables 1, 2, 12, 13):
    python evaluate.py --model runs/agft-eps1/model.pt --datasets all --attacks pgd,cw,aa --out runs/agft-eps1/eval.json
    torchrun --nproc_per_node=2 evaluate.py --model runs/agft-eps1/model.pt --datasets all --attacks pgd,cw,aa \\
        --out runs/agft-eps1/eval.json
Table 6 (the 15 attack columns; its AA column is APGD-CE + APGD-DLR at 10 iterations: a second run, --steps 10):
    python evaluate.py --model runs/agft-eps1/model.pt --datasets all --attacks \\
        pgd,mi,di,ti,ni,pi,pi++,cw,pgd-t-rand,pgd-t-least,mi-t,di-t,ti-t,ni-t --out runs/agft-eps1/table6.json
The original CLIP row: --model ViT-B/32. Another project's released image encoder (its layout is recognised; README,
"Released weights of other projects"), e.g. RobustVLM's FARE at ε = 1/255:
    python evaluate.py --model ViT-B/32 --vision-weights vitb32_fare_eps_1.pt --datasets all --attacks pgd,cw,aa
The demo (no download, a few minutes on a CPU):
    python evaluate.py --model demo --datasets demo --attacks pgd,cw,apgd-ce,apgd-dlr,aa,pgd-t-rand,pgd-t-least --eps 4
Writes --out (JSON) and a Markdown table beside it (same name, .md), and prints the table.
Benchmark (no dataset, no weights; images/s per attack go to the log and to "img_per_s" in --out):
    python evaluate.py --model random:ViT-B/32 --datasets synthetic --samples 512 --attacks pgd,aa --attack-all \\
        --out runs/bench-eval.json
"""
import argparse
import os
import time

import torch

import common

ATTACK_LABELS = {"pgd": "PGD-{n}", "cw": "C&W-{n}", "apgd-ce": "APGD-CE-{n}", "apgd-dlr": "APGD-DLR-{n}",
                 "aa": "AA (APGD-CE + APGD-DLR, {n} it.)", "pgd-t-rand": "PGD-{n} targeted, random class",
                 "pgd-t-least": "PGD-{n} targeted, least-likely class", "mi": "MI-FGSM-{n}", "ni": "NI-FGSM-{n}",
                 "di": "DI²-FGSM-{n}", "ti": "TI-FGSM-{n}", "pi": "PI-FGSM-{n}", "pi++": "PI-FGSM++-{n}",
                 "mi-t": "MI-FGSM-{n} targeted, random class", "di-t": "DI²-FGSM-{n} targeted, random class",
                 "ti-t": "TI-FGSM-{n} targeted, random class", "ni-t": "NI-FGSM-{n} targeted, random class",
                 "apgd-t": "APGD-T-{n} (9 target classes)", "square": "Square ({n} queries)"}


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B/32", help="released CLIP name, checkpoint file, random:ARCH or demo")
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="image-encoder weights (e.g. a robust model another project released, README) loaded into "
                        "--model's image encoder; text encoder from --model")
    p.add_argument("--datasets", default="all",
                   help="comma-separated: dataset names (see README), demo, folder:PATH, all (the AGFT paper's 15), "
                        "or synthetic (random images and 1000 classes, for benchmarks)")
    p.add_argument("--data-root", default="./data", help="directory holding the datasets (layout in the README)")
    p.add_argument("--download", action="store_true", help="download the datasets torchvision can fetch")
    p.add_argument("--class-names", default=None,
                   help="names for WordNet-id classes (ImageNet and variants): 'wnid name' lines, or one name per "
                        "line in sorted wnid order (default: ImageNet's devkit in DATA_ROOT/imagenet)")
    p.add_argument("--template", default=None, help="prompt template for every dataset, e.g. 'a photo of a {}.'")
    p.add_argument("--attacks", default="pgd", help=f"comma-separated, from: {', '.join(common.ATTACKS)}; "
                                                    "'none' for clean accuracy only")
    p.add_argument("--eps", type=float, default=1.0, help="ℓ∞ budget ε in units of 1/255")
    p.add_argument("--alpha", type=float, default=1.0, help="PGD/C&W step size in units of 1/255 (APGD adapts its own)")
    p.add_argument("--steps", type=int, default=None,
                   help="iterations of every attack (default: PGD/C&W 20, APGD 100)")
    p.add_argument("--samples", type=int, default=None, help="evaluate a fixed random subset of N images per dataset")
    p.add_argument("--batch-size", type=int, default=256, help="images per process and batch")
    p.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default="off",
                   help="mixed precision for the model and the attacks (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed for random starts, random targets, --samples, random:ARCH")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (see README)")
    p.add_argument("--attack-all", action="store_true",
                   help="attack every image, also those misclassified clean (same accuracies; for benchmarks with "
                        "random weights, where few images are classified correctly)")
    p.add_argument("--out", default="results.json", help="results file (JSON); the Markdown table goes beside it")
    args = p.parse_args(argv)

    specs = [s.strip() for s in args.datasets.split(",") if s.strip()]
    specs = [n for s in specs for n in (common.AGFT_DATASETS if s.lower() == "all" else [s])]
    known = {n.lower(): n for n in list(common.EVAL_DATASETS) + ["demo", "synthetic"]}  # case-insensitive
    for s in specs:
        if not s.startswith("folder:") and s.lower() not in known:
            raise common.UsageError(f"--datasets {s}: unknown dataset (one of {', '.join(known.values())}, all, "
                                    "folder:PATH)")
    args.datasets = list(dict.fromkeys(s if s.startswith("folder:") else known[s.lower()] for s in specs))
    if not args.datasets:
        raise common.UsageError("--datasets: no dataset given")
    attacks = [] if args.attacks.strip().lower() in ("", "none") else [a.strip() for a in args.attacks.split(",")]
    for a in attacks:
        if a not in common.ATTACKS:
            raise common.UsageError(f"--attacks {a}: unknown attack (one of {', '.join(common.ATTACKS)})")
    args.attacks = list(dict.fromkeys(attacks))
    for name in ("eps", "alpha"):
        if getattr(args, name) < 0:
            raise common.UsageError(f"--{name} {getattr(args, name)}: must be >= 0")
    for name in ("steps", "samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.workers < 0:
        raise common.UsageError(f"--workers {args.workers}: must be >= 0")
    if args.template is not None and "{}" not in args.template:
        raise common.UsageError(f"--template {args.template!r}: must contain {{}} where the class name goes")
    if os.path.isdir(args.out):
        raise common.UsageError(f"--out {args.out}: is a directory, expected a file name")
    return args


# -------------------------------------------------------------------------------------------------------- helpers
def load_datasets(args, dist, resolution):
    """Every --datasets entry as (name, dataset, class names, template), all checked before any attack runs.
    Rank 0 goes first (it alone downloads or unpacks, however long that takes), then the first rank of each other
    node, then the rest read what they left (common.prepare_files)."""
    def load(may_write):
        sets = [common.eval_dataset(s, args.data_root, resolution, args.download and may_write, args.class_names)
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


def markdown_table(results, mean, columns, labels, title):
    """The papers' layout: datasets as columns, settings as rows, the average last."""
    names = list(results)
    cell = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [title, "", "| | " + " | ".join(names) + " | Average |", "|---|" + "---:|" * (len(names) + 1),
             "| images | " + " | ".join(str(results[n]["n"]) for n in names) + " | |"]
    partial = [c for c in columns if mean[c] is not None and any(results[n][c] is None for n in names)]
    for c in columns:
        row = [labels[c]] + [cell(results[n][c]) for n in names] + [cell(mean[c]) + ("*" if c in partial else "")]
        lines.append("| " + " | ".join(row) + " |")
    if partial:
        lines += ["", "\\* mean over the datasets where the attack applies (DLR needs at least 3 classes)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    eps, alpha = args.eps / 255, args.alpha / 255
    dist = common.setup_distributed()
    amp, ctx, _ = common.amp_setup(args.amp, dist.device)
    model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    model = model.to(dist.device).requires_grad_(False).eval()  # no param grads
    sets = load_datasets(args, dist, model.visual.input_resolution)
    encoder = common.compile_encoder(common.ImageEncoder(model.visual).to(dist.device).eval(), args.compile)
    steps = {a: args.steps or common.DEFAULT_ATTACK_STEPS[a] for a in args.attacks}
    log = print if dist.is_main else (lambda *a, **k: None)
    log(f"evaluating {args.model} on {len(sets)} dataset(s), ε = {args.eps:g}/255, attacks: "
        f"{', '.join(f'{a} ({steps[a]} steps)' for a in args.attacks) or 'none'}; {dist.world} process(es), "
        f"{dist.device}, amp {amp}", flush=True)

    results, templates, throughput = {}, {}, {}
    for name, dataset, class_names, template in sets:
        t0 = time.time()
        templates[name] = args.template or template
        dataset = fixed_subset(dataset, args.samples, args.seed)
        text = common.text_features(model, common.prompts_for(class_names, templates[name]), dist.device)  # (C, D)
        throughput[name] = {}  # images/s of the clean pass and of each attack (with its final classification)
        results[name] = common.zero_shot_eval(encoder, text, dataset, dist, tuple(args.attacks), eps, alpha,
                                              args.steps, args.batch_size, ctx, args.seed, args.workers, desc=name,
                                              timing=throughput[name], attack_all=args.attack_all)
        log(f"{name}: {len(class_names)} classes, {results[name]}  ({time.time() - t0:.0f}s; images/s "
            f"{throughput[name]})", flush=True)

    columns = ["clean"] + args.attacks
    mean, notes = summarize(results, columns)
    if "aa" in args.attacks:
        notes += [f"aa on {name} ({len(c)} classes) is APGD-CE alone: DLR needs at least 3 classes"
                  for name, _, c, _ in sets if len(c) < 3]
    report = {"datasets": results, "mean": mean,
              "settings": {"model": args.model, "vision_weights": args.vision_weights, "eps": args.eps,
                           "alpha": args.alpha, "steps": steps,
                           "samples": args.samples, "seed": args.seed, "amp": amp, "processes": dist.world,
                           "batch_size": args.batch_size, "compile": args.compile, "attack_all": args.attack_all,
                           "device": device_name(dist.device), "templates": templates},
              "img_per_s": throughput,
              "notes": list(dict.fromkeys(notes))}
    labels = {"clean": "clean", **{a: ATTACK_LABELS[a].format(n=steps[a]) for a in args.attacks}}
    title = (f"Zero-shot accuracy (%) of {args.model}, ℓ∞ ε = {args.eps:g}/255"
             + (f", PGD/C&W α = {args.alpha:g}/255" if {"pgd", "cw", "pgd-t-rand", "pgd-t-least"} & set(args.attacks)
                else "") + (f", {args.samples} images per dataset at most" if args.samples else ""))
    table = markdown_table(results, mean, columns, labels, title)
    if dist.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        common.write_json(report, args.out)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table)
        print("\n" + table, flush=True)
        print(f"wrote {args.out} and {os.path.splitext(args.out)[0] + '.md'}", flush=True)
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
