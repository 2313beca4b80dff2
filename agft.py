"""AGFT: Alignment-Guided Fine-Tuning of CLIP's image encoder for zero-shot adversarial robustness.

Paper: Cui et al., "AGFT: Alignment-Guided Fine-Tuning for Zero-Shot Adversarial Robustness of Vision-Language
Models", CVPR 2026 (arXiv 2603.29410), Eq. 6-10. Defaults and choices: docs/methods.md#agft.
The image encoder f_θ is trained on adversarial images to match a soft target from the frozen original model,
calibrated with temperature τ/γ:

    p_rob  = softmax(γ · s(f_θorig(x), T) / τ)                         (Eq. 8, on clean x)
    L      = −mean_i Σ_j p_rob[i,j] · log softmax(s(f_θ(x_adv), T) / τ)[i,j]   (Eq. 9)
    min_θ E_x [ max_{x_adv ∈ B(x, ε)} L ]                                (Eq. 10, inner max: PGD-2, α = ε)

Reproduce the paper's main row (ViT-B/32, ImageNet, ε = 1/255, γ = 0.4, 1/τ = 180, 10 epochs, batch 256):
    torchrun --nproc_per_node=2 agft.py --eps 1 --gamma 0.4 --data /path/to/imagenet --out runs/agft-eps1
    python agft.py --eps 1 --gamma 0.4 --data /path/to/imagenet --out runs/agft-eps1      # one process
The demo (no download, a few minutes on a CPU):
    python agft.py --demo
Benchmark (no dataset, no weights: images/s, s/step and peak memory go to the run's log.jsonl):
    python agft.py --model random:ViT-B/32 --data synthetic --max-steps 30      # batch 256, logged every 10 steps
Re-running a command with the same --out resumes from its last.pt.
"""
import argparse
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common


# ------------------------------------------------------------------------------------------ the method (Eq. 8-10)
def check_agft_params(tau, gamma):
    """γ ∈ (0, 1] and τ > 0, else ValueError naming the parameter (agft_loss and the command line both check)."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma {gamma}: must be in (0, 1]")
    if not tau > 0:
        raise ValueError(f"tau {tau}: must be > 0")


def agft_loss(adv_sim, orig_sim, tau=1 / 180, gamma=0.4):
    """AGFT's soft-label cross-entropy (Eq. 9) against the calibrated target of Eq. 8.

    adv_sim:  (B, C) cosine similarities s(f_θ(x_adv), T) of the model being trained.
    orig_sim: (B, C) cosine similarities s(f_θorig(x), T) of the frozen original model on clean x (a constant).
    Returns the mean over the batch of −Σ_j p_rob[i,j] log p_θ[i,j]."""
    check_agft_params(tau, gamma)
    p_rob = F.softmax(orig_sim.detach().float() * (gamma / tau), dim=-1)  # Eq. 8: temperature τ/γ
    log_p = F.log_softmax(adv_sim.float() / tau, dim=-1)  # Eq. 9: the robust model at temperature τ
    return -(p_rob * log_p).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------------- config
def number_or_fraction(text):
    """--tau's type: '0.005' or '1/180' (the paper writes τ as 1/τ values: 100, 140, 180, 220)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number or a fraction such as 1/180") from None


def parse_args(argv=None):
    parser = common.train_parser(__doc__, "agft", lr=4e-4)
    parser.add_argument("--gamma", type=float, default=0.4, help="temperature scaling ratio γ in (0, 1] (Eq. 8)")
    parser.add_argument("--tau", type=number_or_fraction, default=1 / 180,
                        help="temperature τ of Eq. 6-9, a number or a fraction such as 1/180 (default 1/180)")
    args = common.parse_train_args(parser, argv)
    try:
        check_agft_params(args.tau, args.gamma)
    except ValueError as e:
        raise common.UsageError(f"--{e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    eps, alpha = args.eps / 255, args.alpha / 255

    # ------------------------------------------------------------------------------- model, data, run directory
    dist = common.setup_distributed()
    amp, ctx, scaler = common.amp_setup(args.amp, dist.device)
    clip_model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    resolution = clip_model.visual.input_resolution
    dataset, class_names = common.training_dataset(args.data, resolution, args.class_names, args.synthetic_size,
                                                   args.seed)
    dataset = common.take_subset(dataset, args, print if dist.is_main else None)  # --subset, --subset-per-class
    sampler = common.GlobalBatchSampler(len(dataset), args.batch_size, dist.rank, dist.world, args.seed)
    run = common.Run(args, dist, len(dataset), class_names)  # nothing is written before this point
    device = dist.device

    clip_model.to(device).requires_grad_(False)
    text = common.text_features(clip_model, common.prompts_for(class_names), device)  # (C, D), once
    encoder = common.ImageEncoder(clip_model.visual).to(device)  # f_θ, trained
    orig_encoder = common.frozen_copy(encoder)  # f_θorig, frozen before any update
    clip_model.visual.requires_grad_(True)
    optimizer = torch.optim.SGD(clip_model.visual.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = common.schedule_steps(args, steps_per_epoch)  # --epochs, capped by --max-steps
    step = run.start(clip_model, optimizer, scaler, total_steps, steps_per_epoch)  # resumes from last.pt, if any
    before = (common.demo_evaluate(orig_encoder, clip_model, dist, ctx, args, run, "before") if args.data == "demo"
              else None)
    encoder, orig_encoder = (common.compile_encoder(e, args.compile) for e in (encoder, orig_encoder))  # --compile
    train_encoder = DDP(encoder) if dist.world > 1 else encoder
    loader = common.make_loader(dataset, sampler, args.workers, device)
    run.print(f"AGFT: {len(dataset)} images, {len(text)} classes, {common.count(total_steps, 'step')} of global batch "
              f"{args.batch_size} on {dist.world} process(es), {device}, amp {amp}")

    # ------------------------------------------------------------------------------------------------- training
    run.start_timer(step)
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=step % steps_per_epoch)
        for images, _, unreadable in common.progress(loader, dist, desc=f"epoch {epoch}", total=len(sampler)):
            lr = common.cosine_lr(step, args.lr, args.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)  # (b, 3, H, W) in [0, 1], b = batch_size / world

            # --- AGFT: calibrated soft target (Eq. 8) and PGD on the same soft-label loss (Eq. 9-10) ---
            with torch.no_grad(), ctx:
                orig_sim = common.cosine_sim(orig_encoder(images), text)  # (b, C) original model, clean x

            def attack_loss(x):
                with ctx:
                    return agft_loss(common.cosine_sim(encoder(x), text), orig_sim, args.tau, args.gamma)

            encoder.eval()
            delta = common.random_start((args.batch_size, *images.shape[1:]), eps, args.seed, step, dist.rank,
                                        dist.world, device)
            x_adv = common.pgd(attack_loss, images, eps, alpha, args.attack_steps, delta)  # inner max, Eq. 10
            encoder.train()
            with ctx:
                loss = agft_loss(common.cosine_sim(train_encoder(x_adv), text), orig_sim, args.tau, args.gamma)
            # --------------------------------------------------------------------------------------------------

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            run.step_done(step, loss, lr, unreadable)  # log, check, checkpoint; stops after a preemption signal
            if step >= total_steps:
                break

    # ---------------------------------------------------------------------------------------------------- results
    run.write_model(clip_model)
    if before is not None:
        after = common.demo_evaluate(encoder, clip_model, dist, ctx, args, run, "after")
        common.demo_report(run, args, before, after)
    run.print(f"done: {run.dir}/model.pt")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
