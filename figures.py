"""The papers' figures, drawn from evaluate.py's outputs (and a training run's), as PNG (and PDF with --pdf), headless.
The only file of the project that imports matplotlib and scikit-learn. docs/figures.md shows each figure.

    python figures.py pareto A.json B.json ... [--attack pgd] --out pareto.png
        clean against robust accuracy (mean over the datasets), one labelled point per results file (AGFT Figure 3)
    python figures.py eps A-eps1.json A-eps2.json B-eps1.json ... [--attack pgd] --out eps.png
        robust accuracy against the evaluation ε, one line per model (AGFT Table 3 as a curve)
    python figures.py scaling RESULTS.json ... [--x subset] [--by batch_size] [--attack pgd] --out scaling.png
        clean and robust accuracy against the training-set size (or batch size), one line per value of --by, both
        read from each evaluated run's args.json (AdvFLYP Figure 3)
    python figures.py tsne ORIGINAL.npz FINE-TUNED.npz ... [--classes a,b,c] --out tsne.png
        t-SNE of the image embeddings of chosen classes, clean (o) and adversarial (x), one panel per model, from
        `evaluate.py --save-features` (AGFT Figure 4, AdvFLYP Figure 5)
    python figures.py demo runs/agft-demo/results.json --out demo.png
        a demo's held-out and proxy accuracy, clean and under PGD, before and after fine-tuning (every demo draws it)

Every input is checked first, and a problem (no file, not evaluate.py's output, results over different datasets or
images, a class that is not there) stops with one line. Labels: --labels, else the run folder of each model.pt, else
the model's name.

Sections, in the order data flows: inputs, drawing, the figures, main.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # headless: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import evaluate  # noqa: E402  (the labels of its tables)

FIGURES = ("pareto", "eps", "scaling", "tsne", "demo")


# ------------------------------------------------------------------------------------------------------------ inputs
def read_json(path, what):
    if not os.path.isfile(path):
        raise common.UsageError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise common.UsageError(f"{path}: not {what} ({type(e).__name__})")


def read_results(paths, attack=None):
    """evaluate.py's results files, checked: each complete, all over the same datasets; and the robust column
    (`attack`, else the first attack of the first file), present in every file. Returns (results, attack)."""
    if not paths:
        raise common.UsageError("no results files given (evaluate.py --out FILE.json)")
    results = []
    for path in paths:
        r = read_json(path, "a results file of evaluate.py")
        if not isinstance(r, dict) or not {"mean", "settings", "datasets"} <= set(r):
            raise common.UsageError(f"{path}: not a results file of evaluate.py (no mean, settings or datasets)")
        if not r.get("complete"):
            raise common.UsageError(f"{path}: the evaluation is incomplete (rerun its command to finish it)")
        results.append(r)
    first = results[0]["settings"]["datasets"]
    for path, r in zip(paths, results):
        if r["settings"]["datasets"] != first:
            raise common.UsageError(f"{path}: evaluated on {', '.join(r['settings']['datasets'])}, {paths[0]} on "
                                    f"{', '.join(first)}: a mean over other datasets cannot be compared")
    attack = attack or next(iter(results[0]["settings"]["attacks"]), None)
    if attack is None:
        raise common.UsageError(f"{paths[0]}: has no attack; give --attack")
    for path, r in zip(paths, results):
        if r["mean"].get(attack) is None:
            raise common.UsageError(f"{path}: has no {attack} accuracy (its attacks: "
                                    f"{', '.join(r['settings']['attacks']) or 'none'})")
    return results, attack


def model_label(settings):
    """A short name for the evaluated model: its run folder (runs/agft-eps1/model.pt -> agft-eps1), the file of
    --vision-weights, or the model's name."""
    if settings.get("vision_weights"):
        return os.path.basename(settings["vision_weights"])
    model = settings["model"]
    if os.path.basename(model) in ("model.pt", "last.pt", "best.pt"):
        return os.path.basename(os.path.dirname(os.path.abspath(model)))
    return model


def labels_for(results, labels):
    """--labels (comma-separated, one per file), else model_label of each."""
    if labels is None:
        return [model_label(r["settings"]) for r in results]
    labels = [s.strip() for s in labels.split(",")]
    if len(labels) != len(results):
        raise common.UsageError(f"--labels: {len(labels)} labels for {len(results)} files")
    return labels


def run_setting(result, key, path):
    """A training flag (e.g. subset, batch_size) of the run whose model.pt a results file evaluated, from the run's
    args.json; with --subset unset, the size of the data it trained on (its log's first record)."""
    model = result["settings"]["model"]
    run_args = os.path.join(os.path.dirname(os.path.abspath(model)), "args.json")
    if not os.path.isfile(run_args):
        raise common.UsageError(f"{path}: its model {model} is not in a training run's folder (no args.json beside "
                                "it); give --values")
    value = read_json(run_args, "a run's args.json").get(key)
    if value is None and key in ("subset", "subset_per_class"):
        raise common.UsageError(f"{path}: the run of {model} has no --{key.replace('_', '-')} (it trained on all of "
                                "its data); give --values")
    if value is None:
        raise common.UsageError(f"{path}: the run of {model} has no setting {key!r}")
    return value


def read_features(paths, dataset=None):
    """evaluate.py --save-features files, checked: the same dataset (`dataset`, default the first of the first
    file) and the same images in each, with adversarial embeddings. Returns [(meta, arrays of that dataset)]."""
    if not paths:
        raise common.UsageError("no features files given (evaluate.py --save-features FILE.npz)")
    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise common.UsageError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != "clip-aft-features/1":
                    raise ValueError(f"format {meta.get('format')!r}")
                names = [d["name"] for d in meta["datasets"]]
                name = dataset or names[0]
                if name not in names:
                    raise common.UsageError(f"{path}: has no dataset {name} (it has {', '.join(names)})")
                k = names.index(name)
                arrays = {key.split(".", 1)[1]: z[key] for key in z.files if key.startswith(f"{k}.")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise common.UsageError(f"{path}: not a features file of evaluate.py --save-features "
                                    f"({type(e).__name__}: {str(e)[:100]})")
        if "adv" not in arrays:
            raise common.UsageError(f"{path}: has no adversarial embeddings of {name} (evaluated without an attack)")
        dataset = name
        out.append((meta | {"dataset": meta["datasets"][k]}, arrays))
    for path, (meta, arrays) in zip(paths[1:], out[1:]):
        if not np.array_equal(arrays["index"], out[0][1]["index"]):
            raise common.UsageError(f"{path}: holds other images of {dataset} than {paths[0]} (give both runs the same "
                                    "--samples and --seed)")
    return out


# ----------------------------------------------------------------------------------------------------------- drawing
def save(fig, out, pdf=False):
    """Write the figure to `out` (PNG, atomically), and beside it as .pdf with pdf=True; returns the paths."""
    if os.path.isdir(out):
        raise common.UsageError(f"--out {out}: is a directory, expected a file name")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [out] + ([os.path.splitext(out)[0] + ".pdf"] if pdf else [])
    for path in paths:
        kind = "pdf" if path.endswith(".pdf") else "png"
        common.atomic_write(path, lambda f: fig.savefig(f, format=kind, dpi=150, bbox_inches="tight"))
    plt.close(fig)
    return paths


def attack_label(result, attack):
    """The table's label of a column, e.g. 'PGD-20'."""
    steps = result["settings"]["steps"].get(attack)
    return evaluate.ATTACK_LABELS.get(attack, attack).format(n=steps)


# ------------------------------------------------------------------------------------------------------- the figures
def pareto(results, attack, labels):
    """AGFT Figure 3: mean clean against mean robust accuracy, one labelled point per results file."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for r, label in zip(results, labels):
        x, y = r["mean"]["clean"], r["mean"][attack]
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    eps = sorted({r["settings"]["eps"] for r in results})
    ax.set_xlabel("clean accuracy (%), mean over datasets")
    ax.set_ylabel(f"{attack_label(results[0], attack)} accuracy (%), ε = {'/'.join(f'{e:g}' for e in eps)}/255")
    ax.set_title(f"Clean vs robust accuracy ({common.count(len(results[0]['settings']['datasets']), 'dataset')})")
    ax.grid(alpha=0.3)
    return fig


def eps_curve(results, attack, labels):
    """AGFT Table 3 as a curve: robust accuracy against the evaluation ε, one line per model (files with the same
    label are one model at several ε)."""
    lines = {}
    for r, label in zip(results, labels):
        lines.setdefault(label, []).append((r["settings"]["eps"], r["mean"][attack]))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, points in lines.items():
        eps = [e for e, _ in points]
        if len(set(eps)) != len(eps):
            raise common.UsageError(f"{label}: two results files at the same ε ({eps}); give --labels")
        points.sort()
        ax.plot([e for e, _ in points], [a for _, a in points], marker="o", label=label)
    ax.set_xlabel("ε (/255)")
    ax.set_ylabel(f"{attack_label(results[0], attack)} accuracy (%), mean over datasets")
    ax.set_title("Robust accuracy against the attack budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def scaling(results, attack, xs, groups, x_name, by_name):
    """AdvFLYP Figure 3: clean and robust accuracy against the training-set size (or batch size), one line per
    value of `by` (the batch size)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g in sorted(set(groups), key=str):
        points = sorted((x, r) for x, r, g_ in zip(xs, results, groups) if g_ == g)
        for ax, column in zip(axes, ("clean", attack)):
            ax.plot([x for x, _ in points], [r["mean"][column] for _, r in points], marker="o",
                    label=f"{by_name} {g}" if by_name else None)
    for ax, column in zip(axes, ("clean", attack)):
        ax.set_xlabel(x_name)
        ax.set_ylabel(f"{'clean' if column == 'clean' else attack_label(results[0], column)} accuracy (%)")
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if by_name:
            ax.legend(fontsize=8)
    datasets = common.count(len(results[0]["settings"]["datasets"]), "dataset")
    fig.suptitle(f"Accuracy against {x_name} (mean over {datasets})")
    return fig


def tsne(features, labels, classes=None, num_classes=10, seed=0):
    """AGFT Figure 4 / AdvFLYP Figure 5: the 2-D t-SNE of the L2-normalised embeddings of the chosen classes' images
    (num_classes 0: every image of the file), clean (o) and adversarial (x) together, one panel per model; each
    panel says its mean cosine deviation φ over every image of the file (the evaluated sample, e.g. AdvFLYP's 256),
    whatever classes are drawn."""
    from sklearn.manifold import TSNE
    meta, first = features[0]
    names = meta["dataset"]["classes"]
    if classes is None and num_classes == 0:
        chosen = [int(c) for c in np.unique(first["label"])]
    elif classes is None:
        present, counts = np.unique(first["label"], return_counts=True)
        chosen = [int(c) for c in present[np.argsort(-counts, kind="stable")][:num_classes]]  # the largest classes
    else:
        wanted = [c.strip() for c in classes.split(",") if c.strip()]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise common.UsageError(f"--classes {missing[0]}: not a class of {meta['dataset']['name']} (its classes: "
                                    f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
        chosen = [names.index(c) for c in wanted]
    keep = np.isin(first["label"], chosen)
    if keep.sum() < 2:
        raise common.UsageError(f"{meta['dataset']['name']}: fewer than 2 images of the chosen classes")
    fig, axes = plt.subplots(1, len(features), figsize=(4.6 * len(features), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10" if len(chosen) <= 10 else "tab20")
    for ax, (meta_, arrays), label in zip(axes[0], features, labels):
        phi = math.radians(evaluate.cosine_deviation(torch.from_numpy(arrays["clean"]),
                                                     torch.from_numpy(arrays["adv"])).double().mean())  # every image
        clean, adv, y = arrays["clean"][keep], arrays["adv"][keep], arrays["label"][keep]
        points = np.concatenate([clean, adv])
        points = points / np.linalg.norm(points, axis=1, keepdims=True)
        perplexity = min(30.0, (len(points) - 1) / 3)
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
        n = len(clean)
        for j, c in enumerate(chosen):
            ax.scatter(*xy[:n][y == c].T, s=12, marker="o", color=colours(j % colours.N),
                       label=names[c] if len(chosen) <= 20 else None)
            ax.scatter(*xy[n:][y == c].T, s=14, marker="x", color=colours(j % colours.N))
        ax.set_title(f"{label}\nφ = {phi:.4f} rad ({math.degrees(phi):.1f}°) over {len(arrays['label'])} images, "
                     f"{meta_['attack']} ε = {meta_['eps']:g}/255", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), title="o clean, x adversarial",
                       title_fontsize=7)  # outside the last panel: no point hidden
    return fig


def demo(results, method_label=None):
    """A demo run's results.json: held-out and proxy accuracy, clean and PGD-20, before and after fine-tuning."""
    columns = [("held-out clean", results["before"]["clean"], results["after"]["clean"]),
               ("held-out PGD", results["before"]["pgd"], results["after"]["pgd"]),
               ("proxy clean", results["proxy"]["before"]["clean"], results["proxy"]["after"]["clean"]),
               ("proxy PGD", results["proxy"]["before"]["pgd"], results["proxy"]["after"]["pgd"])]
    method = method_label or common.METHOD_NAMES.get(results["method"], results["method"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(len(columns))
    for shift, k, label in ((-0.2, 1, "before (original CLIP)"), (0.2, 2, f"after ({method})")):
        bars = ax.bar(x + shift, [c[k] for c in columns], width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [c[0] for c in columns])
    ax.set_ylim(0, 105)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"The demo: {method}, ε = {results['eps']:g}/255, PGD-20")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def read_demo(path):
    """A demo run's results.json, checked to hold the before/after numbers demo() draws."""
    r = read_json(path, "a demo's results.json")
    try:
        [float(r[when]["clean"]) + float(r[when]["pgd"]) + float(r["proxy"][when]["clean"])
         + float(r["proxy"][when]["pgd"]) for when in ("before", "after")]
        float(r["eps"]), str(r["method"])
    except (KeyError, TypeError, ValueError):
        raise common.UsageError(f"{path}: not a demo's results.json (no before/after accuracies)") from None
    return r


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("figure", choices=FIGURES, help="which figure")
    p.add_argument("inputs", nargs="*", help="evaluate.py results (.json), --save-features files (.npz: tsne) or a "
                                             "demo's results.json (demo)")
    p.add_argument("--out", default=None, help="the PNG to write (default: <figure>.png)")
    p.add_argument("--pdf", action="store_true", help="also write the figure as PDF beside the PNG")
    p.add_argument("--attack", default=None, help="the robust column (default: the first attack of the first file)")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per input (default: run folders)")
    p.add_argument("--x", default="subset", help="scaling: the run's flag on the x axis (subset, subset_per_class, "
                                                 "batch_size, epochs, ...)")
    p.add_argument("--by", default="batch_size", help="scaling: the run's flag that makes one line per value "
                                                      "('none': one line)")
    p.add_argument("--values", default=None,
                   help="scaling: the x value of each input, comma-separated, instead of reading the runs' args.json")
    p.add_argument("--dataset", default=None, help="tsne: the dataset of the features files (default: their first)")
    p.add_argument("--classes", default=None, help="tsne: comma-separated class names (default: --num-classes of "
                                                   "the largest classes)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="tsne: how many classes without --classes (the largest; 0: every image of the file)")
    p.add_argument("--seed", type=int, default=0, help="tsne: t-SNE's random state")
    args = p.parse_args(argv)
    args.out = args.out or f"{args.figure}.png"
    if not args.out.lower().endswith(".png"):
        raise common.UsageError(f"--out {args.out}: expected a .png file name (--pdf adds the .pdf beside it)")
    if args.num_classes < 0:
        raise common.UsageError(f"--num-classes {args.num_classes}: must be >= 0 (0: every image)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.figure == "tsne":
        features = read_features(args.inputs, args.dataset)
        labels = ([model_label(meta) for meta, _ in features] if args.labels is None
                  else labels_for(features, args.labels))
        fig = tsne(features, labels, args.classes, args.num_classes, args.seed)
    elif args.figure == "demo":
        if len(args.inputs) != 1:
            raise common.UsageError("demo: give one demo run's results.json")
        fig = demo(read_demo(args.inputs[0]))
    else:
        results, attack = read_results(args.inputs, args.attack)
        labels = labels_for(results, args.labels)
        if args.figure == "pareto":
            fig = pareto(results, attack, labels)
        elif args.figure == "eps":
            fig = eps_curve(results, attack, labels)
        else:
            if args.values is not None:
                try:
                    xs = [float(v) for v in args.values.split(",")]
                except ValueError:
                    raise common.UsageError(f"--values {args.values}: expected comma-separated numbers") from None
                if len(xs) != len(results):
                    raise common.UsageError(f"--values: {len(xs)} values for {len(results)} files")
            else:
                xs = [run_setting(r, args.x, path) for r, path in zip(results, args.inputs)]
            by = None if args.by.lower() == "none" else args.by
            groups = [run_setting(r, by, path) if by and args.values is None else "" for r, path in
                      zip(results, args.inputs)]
            fig = scaling(results, attack, xs, groups, args.x.replace("_", " "), by if any(groups) else None)
    for path in save(fig, args.out, args.pdf):
        print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main)
