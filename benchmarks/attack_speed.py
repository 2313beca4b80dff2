"""Our attacks against torchattacks', side by side in one process: images per second and robust accuracy of each.

    python benchmarks/attack_speed.py                       # the demo CLIP on the CPU, ε = 4/255 (docs/performance.md)
    python benchmarks/attack_speed.py --model ViT-B/32 --images 512 --batch-size 256 --amp bf16   # on a GPU

Needs the test requirements (requirements-test.txt: torchattacks). For each attack, one after another on the same
model, the same images (clean-correct or not: both sides attack the clean-correct ones only, as evaluate.py does and
torchattacks' APGD does) and the same ε, in batches of --batch-size:

    ours     attacks.run_attack, as evaluate.py runs it (APGD's early exit on: the default)
    ours, no early exit   the same without early exit (--no-early-exit-too): its per-image results must be the same
    theirs   torchattacks 3.5.1: PGD, APGD (CE), APGDT (9 targets, as ours and AutoAttack's; its default is all C − 1),
             and AutoAttack(version="rand") with eot_iter=1 and our number
             of iterations (APGD-CE then APGD-DLR on the survivors: what our `aa` runs; "rand" runs a deterministic
             model's 20 identical EOT gradients, which would only make it 20 times slower)

It prints one row per attack and side: images per second (all images, clean-correct or not, over the attack's wall
time; torchattacks': the mean over its seeds), the ratio to torchattacks, and the robust accuracy; torchattacks runs
with --peer-seeds seeds, for the spread of its accuracy (its draws differ from ours; only the spread says whether a
difference is real).
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
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eps", type=float, default=4.0, help="ε in units of 1/255 (default 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="PGD's step in units of 1/255 (default 1)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    p.add_argument("--steps", type=int, default=100, help="every attack's iterations (default 100)")
    p.add_argument("--peer-seeds", type=int, default=3, help="torchattacks' seeds for its accuracy spread (default 3)")
    p.add_argument("--no-early-exit-too", action="store_true", help="also run ours without APGD's early exit")
    p.add_argument("--amp", default="off", choices=("off", "bf16"), help="autocast for both sides (default off)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
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
def ours(name, model, args, early_exit=True):
    """x, y, index -> x_adv: our attack, attacks.run_attack as evaluate.py calls it."""
    eps, alpha = args.eps / 255, args.alpha / 255

    def run(x, y, index):
        with attacks.early_exit(early_exit):
            return attacks.run_attack(name, model, x, y, index, eps, alpha, args.steps, 0, {})
    return run


def theirs(name, model, args, seed):
    """x, y, index -> x_adv: torchattacks' attack for `name` at our ε, α and iterations."""
    import torchattacks
    eps, n = args.eps / 255, args.steps
    if name == "pgd":
        atk = torchattacks.PGD(model, eps=eps, alpha=args.alpha / 255, steps=n, random_start=True)
    elif name == "apgd-ce":
        atk = torchattacks.APGD(model, eps=eps, steps=n, loss="ce", seed=seed)
    elif name == "apgd-t":
        atk = torchattacks.APGDT(model, eps=eps, steps=n, n_classes=len(model.text), seed=seed)
        atk.n_target_classes = min(9, len(model.text) - 1)  # AutoAttack's 9 (torchattacks' default: all C − 1)
    else:  # aa: AutoAttack's "rand" composition (APGD-CE, then APGD-DLR on the survivors), EOT off, our iterations
        atk = torchattacks.AutoAttack(model, eps=eps, version="rand", n_classes=len(model.text), seed=seed)
        for part in atk._autoattack.attacks:
            part.eot_iter, part.steps = 1, n

    def run(x, y, index):
        torch.manual_seed(seed)  # PGD's random start draws from the global generator
        return atk(x, y)
    return run


def warm_up(model, x, y, ctx):
    """One forward and input backward before any clock starts (allocators, thread pools, CUDA kernels)."""
    with ctx:
        common.input_grad(lambda z: common.cross_entropy_per_sample(model(z), y).sum(), x)


def measure(attack, model, x, y, clean, args, ctx):
    """(images per second over all N images, robust accuracy %): the attack on the clean-correct images of each batch,
    then the classification of its x_adv."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    robust = torch.zeros_like(clean)
    sync()
    start = time.perf_counter()
    for s in range(0, len(x), args.batch_size):
        keep = clean[s:s + args.batch_size].nonzero()[:, 0] + s  # (b,) this batch's clean-correct images
        if len(keep) == 0:
            continue
        with ctx:
            x_adv = attack(x[keep], y[keep], keep.cpu())
            with torch.no_grad():
                robust[keep] = model(x_adv).argmax(-1) == y[keep]
    sync()
    return len(x) / (time.perf_counter() - start), 100.0 * robust.float().mean().item(), robust


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
          f"{args.batch_size}, amp {args.amp}")
    print(f"{'attack':8} {'side':22} {'img/s':>8} {'ratio':>6} {'robust %':>9}")
    rows = []
    warm_up(model, x[:args.batch_size], y[:args.batch_size], ctx)
    for name in args.attacks:
        peer = [measure(theirs(name, model, args, seed), model, x, y, clean, args, ctx)
                for seed in range(args.peer_seeds)]
        peer_speed = sum(p[0] for p in peer) / len(peer)  # the mean over its seeds
        sides = [("ours", ours(name, model, args))]
        if args.no_early_exit_too:
            sides.append(("ours, no early exit", ours(name, model, args, early_exit=False)))
        results = [(side, *measure(run, model, x, y, clean, args, ctx)) for side, run in sides]
        accs = [p[1] for p in peer]
        for side, speed, acc, robust in results:
            rows.append(dict(attack=name, side=side, img_per_s=speed, ratio=speed / peer_speed, robust=acc))
            print(f"{name:8} {side:22} {speed:8.2f} {speed / peer_speed:6.2f} {acc:9.2f}", flush=True)
        if len(results) == 2:  # the same per-image results, up to the float rounding of differently sized batches
            differ = int((results[0][3] != results[1][3]).sum())
            rows[-1]["images_differing_from_early_exit"] = differ
            print(f"{'':8} {'per-image results differ:':22} {differ} images", flush=True)
        rows.append(dict(attack=name, side="torchattacks", img_per_s=peer_speed, ratio=1.0, robust=accs[0],
                         robust_over_seeds=accs))
        spread = f"   seeds 0-{len(accs) - 1}: {min(accs):.2f}-{max(accs):.2f}" if len(accs) > 1 else ""
        print(f"{name:8} {'torchattacks':22} {peer_speed:8.2f} {1.0:6.2f} {accs[0]:9.2f}{spread}", flush=True)
    if args.json:
        common.write_json(dict(device=str(device), threads=torch.get_num_threads(), args=vars(args), rows=rows),
                          args.json)
    return rows


if __name__ == "__main__":
    main()
