"""Our attacks against torchattacks', side by side in one process: images per second and robust accuracy of each.

    python benchmarks/attack_speed.py                       # the demo CLIP on the CPU, ε = 4/255 (docs/performance.md)
    python benchmarks/attack_speed.py --model ViT-B/32 --images 512 --amp bf16   # on a GPU

Needs the test requirements (requirements-test.txt: torchattacks). For each attack, on the same model, the same images
(clean-correct or not: both sides attack the clean-correct ones only, as evaluate.py does and torchattacks' APGD does)
and the same ε, in batches of --batch-size:

    ours     attacks.run_attack, as evaluate.py runs it (APGD's early exit on: the default)
    ours, no early exit   the same without early exit (--no-early-exit-too): its per-image results must be the same
    theirs   torchattacks 3.5.1: PGD, APGD (CE), APGDT (9 targets, as ours and AutoAttack's; its default is all C − 1),
             and AutoAttack(version="rand") with eot_iter=1 and our number
             of iterations (APGD-CE then APGD-DLR on the survivors: what our `aa` runs; "rand" runs a deterministic
             model's 20 identical EOT gradients, which would only make it 20 times slower). Its APGD-CE ascends
             nn.CrossEntropyLoss, which rounds to 0 (and its gradient's true-class entry too) for an image classified
             with a margin above ~17 at CLIP's scale 100; ours ascends the same loss computed without that
             cancellation (docs/evaluation.md), a stronger attack. --peer-stable-ce gives torchattacks' APGD-CE our
             loss, so that the two sides run the same attack and differ only in their random draws.

Each side runs with --seeds seeds (its random starts; the draws of the two sides differ, so only the spread over seeds
says whether a difference in accuracy is real), interleaved: seed 0 of every side, then seed 1 with the sides' order
rotated, and so on, so that a change in the machine's load falls on both sides alike. It prints one row per attack and
side: images per second (all images, clean-correct or not, over the attack's wall time; the mean over seeds), the ratio
of the means to torchattacks' and the range of the per-seed ratios (each seed's run against torchattacks' run beside
it), the robust accuracy (seed 0, and the range over seeds), and the forward and backward passes through the model
per attacked image (the mean over seeds: the work done, which does not depend on the machine).
--json FILE writes the rows. Sections: arguments, model and images, the two sides, main.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attacks  # noqa: E402
import common  # noqa: E402

# --------------------------------------------------------------------------------------------------------- arguments
ATTACKS = ("pgd", "apgd-ce", "apgd-t", "aa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo (default), an OpenAI name or file, or random:ARCH")
    p.add_argument("--images", type=int, default=256, help="held-out demo images (16 classes); default 256")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256, evaluate.py's)")
    p.add_argument("--eps", type=float, default=4.0, help="ε in units of 1/255 (default 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="PGD's step in units of 1/255 (default 1)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    p.add_argument("--steps", type=int, default=100, help="every attack's iterations (default 100)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each side, for the spread of its accuracy "
                   "and speed (default 3)")
    p.add_argument("--peer-stable-ce", action="store_true",
                   help="torchattacks' APGD-CE (alone and in aa) ascends our cancellation-free cross-entropy "
                   "(common.cross_entropy_per_sample) instead of nn.CrossEntropyLoss, as our APGD-CE does")
    p.add_argument("--no-early-exit-too", action="store_true", help="also run ours without APGD's early exit")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="autocast for both sides (default off)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    args.attacks = args.attacks.split(",")
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        p.error(f"--attacks: unknown {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    return args


# -------------------------------------------------------------------------------------------------- model and images
class Classifier(torch.nn.Module):
    """100 · s(f(x), T) as an nn.Module (torchattacks reads the device from its parameters)."""

    def __init__(self, encoder, text):
        super().__init__()
        self.encoder, self.text = encoder, text

    def forward(self, x):
        return common.CLIP_LOGIT_SCALE * common.cosine_sim(self.encoder(x), self.text)


def model_and_images(args, device):
    """The zero-shot classifier of the held-out demo classes and args.images of their images (x (N, 3, S, S), y)."""
    clip_model = common.load_clip(args.model).to(device).eval().requires_grad_(False)
    ds = common.DemoImages(common.DEMO_HELD_OUT, -(-args.images // len(common.DEMO_HELD_OUT)),
                           clip_model.visual.input_resolution, seed=2)
    text = common.text_features(clip_model, common.prompts_for(ds.classes), device)
    model = Classifier(common.ImageEncoder(clip_model.visual).eval(), text)
    x = torch.stack([ds[i][0] for i in range(args.images)]).to(device)
    y = torch.tensor([ds[i][1] for i in range(args.images)], device=device)
    return model, x, y


# ----------------------------------------------------------------------------------------------------- the two sides
def ours(name, model, args, seed, early_exit=True):
    """x, y, index -> x_adv: our attack with this seed, attacks.run_attack as evaluate.py calls it."""
    eps, alpha = args.eps / 255, args.alpha / 255

    def run(x, y, index):
        with attacks.early_exit(early_exit):
            return attacks.run_attack(name, model, x, y, index, eps, alpha, args.steps, seed, {})
    return run


def with_our_ce(apgd):
    """torchattacks' APGD `apgd` made to ascend our cross-entropy (common.cross_entropy_per_sample, without
    cancellation) instead of nn.CrossEntropyLoss: it calls self.dlr_loss when loss == "dlr", so our CE goes there."""
    apgd.loss, apgd.dlr_loss = "dlr", common.cross_entropy_per_sample
    return apgd


def theirs(name, model, args, seed):
    """x, y, index -> x_adv: torchattacks' attack for `name` at our ε, α and iterations."""
    import torchattacks
    eps, n = args.eps / 255, args.steps
    if name == "pgd":
        atk = torchattacks.PGD(model, eps=eps, alpha=args.alpha / 255, steps=n, random_start=True)
    elif name == "apgd-ce":
        atk = torchattacks.APGD(model, eps=eps, steps=n, loss="ce", seed=seed)
        if args.peer_stable_ce:
            with_our_ce(atk)
    elif name == "apgd-t":
        atk = torchattacks.APGDT(model, eps=eps, steps=n, n_classes=len(model.text), seed=seed)
        atk.n_target_classes = min(9, len(model.text) - 1)  # AutoAttack's 9 (torchattacks' default: all C − 1)
    else:  # aa: AutoAttack's "rand" composition (APGD-CE, then APGD-DLR on the survivors), EOT off, our iterations
        atk = torchattacks.AutoAttack(model, eps=eps, version="rand", n_classes=len(model.text), seed=seed)
        for part in atk._autoattack.attacks:
            part.eot_iter, part.steps = 1, n
        if args.peer_stable_ce:
            with_our_ce(atk._autoattack.attacks[0])  # its APGD-CE

    def run(x, y, index):
        torch.manual_seed(seed)  # PGD's random start draws from the global generator
        return atk(x, y)
    return run


def warm_up(model, x, y, ctx):
    """One forward and input backward before any clock starts (allocators, thread pools, CUDA kernels)."""
    with ctx:
        common.input_grad(lambda z: common.cross_entropy_per_sample(model(z), y).sum(), x)


def measure(attack, model, x, y, clean, args, ctx):
    """(images per second over all N images, robust accuracy %, robust (N,) bool, (forward, backward) passes per
    attacked image): the attack on the clean-correct images of each batch, then the classification of its x_adv. The
    passes are the rows through the model inside the attack (forward) and the rows whose input gradient it took
    (backward): the work done, whatever the machine."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    robust, passes = torch.zeros_like(clean), [0, 0]

    def count(module, inputs):
        passes[0] += inputs[0].shape[0]
        if inputs[0].requires_grad:
            inputs[0].register_hook(lambda g: passes.__setitem__(1, passes[1] + g.shape[0]))
    sync()
    start = time.perf_counter()
    for s in range(0, len(x), args.batch_size):
        keep = clean[s:s + args.batch_size].nonzero()[:, 0] + s  # (b,) this batch's clean-correct images
        if len(keep) == 0:
            continue
        with ctx:
            hook = model.register_forward_pre_hook(count)
            try:
                x_adv = attack(x[keep], y[keep], keep.cpu())
            finally:
                hook.remove()
            with torch.no_grad():
                robust[keep] = model(x_adv).argmax(-1) == y[keep]
    sync()
    seconds = time.perf_counter() - start
    attacked = max(int(clean.sum()), 1)
    return len(x) / seconds, 100.0 * robust.float().mean().item(), robust, (passes[0] / attacked, passes[1] / attacked)


def side_by_side(name, model, x, y, clean, args, ctx):
    """{side: [measure(...) for each seed]} for the attack `name`, the sides interleaved seed by seed, their order
    rotated from one seed to the next."""
    sides = {"torchattacks": lambda seed: theirs(name, model, args, seed),
             "ours": lambda seed: ours(name, model, args, seed)}
    if args.no_early_exit_too:
        sides["ours, no early exit"] = lambda seed: ours(name, model, args, seed, early_exit=False)
    results = {side: [] for side in sides}
    order = list(sides)
    for seed in range(args.seeds):
        for side in order[seed % len(order):] + order[:seed % len(order)]:
            results[side].append(measure(sides[side](seed), model, x, y, clean, args, ctx))
    return results


def rows_of(name, results):
    """One row per side: mean img/s over seeds, the ratio of the means to torchattacks', the per-seed ratios, robust
    accuracy (seed 0) and over seeds, forward and backward passes per attacked image (mean over seeds)."""
    peer = results["torchattacks"]
    peer_speed = sum(r[0] for r in peer) / len(peer)
    rows = []
    for side, runs in results.items():
        speed = sum(r[0] for r in runs) / len(runs)
        row = dict(attack=name, side=side, img_per_s=speed, ratio=speed / peer_speed,
                   ratio_per_seed=[r[0] / p[0] for r, p in zip(runs, peer)], robust=runs[0][1],
                   robust_over_seeds=[r[1] for r in runs],
                   forward_passes_per_image=sum(r[3][0] for r in runs) / len(runs),
                   backward_passes_per_image=sum(r[3][1] for r in runs) / len(runs))
        if side == "ours, no early exit":  # the same per-image results, up to the float rounding of other batch sizes
            row["images_differing_from_early_exit"] = sum(
                int((r[2] != e[2]).sum()) for r, e in zip(runs, results["ours"]))
        rows.append(row)
    return rows


def print_row(row):
    span = lambda v, f: f"{min(v):{f}}-{max(v):{f}}"  # noqa: E731
    print(f"{row['attack']:8} {row['side']:20} {row['img_per_s']:7.2f} {row['ratio']:6.2f} "
          f"{span(row['ratio_per_seed'], '.2f'):>10} {row['robust']:8.2f} {span(row['robust_over_seeds'], '.2f'):>12} "
          f"{row['forward_passes_per_image']:6.1f} {row['backward_passes_per_image']:6.1f}", flush=True)
    if "images_differing_from_early_exit" in row:
        print(f"{'':8} per-image results differing from early exit's, all seeds: "
              f"{row['images_differing_from_early_exit']} images", flush=True)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, ctx, _ = common.amp_setup(args.amp, device)
    model, x, y = model_and_images(args, device)
    with torch.no_grad(), ctx:
        clean = model(x).argmax(-1) == y
    print(f"{device}, {torch.get_num_threads()} threads, model {args.model}, {len(x)} images "
          f"({100 * clean.float().mean():.1f}% clean), ε = {args.eps:g}/255, {args.steps} iterations, batch "
          f"{args.batch_size}, amp {args.amp}, {args.seeds} seeds per side")
    print(f"{'attack':8} {'side':20} {'img/s':>7} {'ratio':>6} {'per seed':>10} {'robust %':>8} {'over seeds':>12} "
          f"{'fwd':>6} {'bwd':>6}")
    rows = []
    warm_up(model, x[:args.batch_size], y[:args.batch_size], ctx)
    for name in args.attacks:
        for row in rows_of(name, side_by_side(name, model, x, y, clean, args, ctx)):
            rows.append(row)
            print_row(row)
    if args.json:
        common.write_json(dict(device=str(device), threads=torch.get_num_threads(), args=vars(args), rows=rows),
                          args.json)
    return rows


if __name__ == "__main__":
    main()
