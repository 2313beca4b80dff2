"""TeCoA: adversarial fine-tuning of CLIP's image encoder with hard-label cross-entropy; PMG-AFT with --pmg.

Papers: TeCoA (Mao et al., ICLR 2023) as written in ../shared/papers/000_* (AGFT) Eq. 4-5; PMG-AFT (Wang et al.,
CVPR 2024) as described in AGFT §6 / Table 11. Decisions in ../shared/SPEC.md §4.
The image encoder f_θ is trained to classify adversarial images into their ImageNet class prompts T:

    L_CE   = −mean_i log softmax(100 · s(f_θ(x_adv), T))[i, y_i]             (Eq. 4)
    min_θ E_x [ max_{x_adv ∈ B(x, ε)} L_CE ]                               (Eq. 5, inner max: PGD-2, α = ε)

PMG-AFT adds two KL terms, weight 1 each, all at scale 100, with p(·) = softmax(100 · s(·, T)):

    L_PMG  = L_CE + KL(p_θorig(x_adv) ‖ p_θ(x_adv)) + KL(p_θ(x) ‖ p_θ(x_adv))
    (f_θorig frozen, under no_grad; the clean term p_θ(x) is not detached.) Its inner max is TeCoA's: PGD on L_CE,
    as in the PMG-AFT authors' code.

Reproduce the paper's rows (ViT-B/32, ImageNet, ε = 1/255, lr 1e-5, 10 epochs, batch 256):
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --data /path/to/imagenet --out runs/tecoa-eps1
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --pmg --data /path/to/imagenet --out runs/pmg-aft-eps1
    python tecoa.py --eps 1 --data /path/to/imagenet --out runs/tecoa-eps1      # one process
The demo (no download, a few minutes on a CPU):
    python tecoa.py --demo
    python tecoa.py --demo --pmg
Benchmark (no dataset, no weights: images/s, s/step and peak memory go to the run's log.jsonl):
    python tecoa.py --model random:ViT-B/32 --data synthetic --max-steps 30      # batch 256, logged every 10 steps
Re-running a command with the same --out resumes from its last.pt.
"""
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common


# ------------------------------------------------------------------------------- the method (Eq. 4-5, PMG-AFT)
def tecoa_loss(adv_sim, labels, logit_scale=100.0):
    """TeCoA's hard-label cross-entropy (Eq. 4).

    adv_sim: (B, C) cosine similarities s(f_θ(x_adv), T); labels: (B,) class indices.
    Returns the mean over the batch of −log softmax(logit_scale · s)[i, y_i]."""
    return F.cross_entropy(logit_scale * adv_sim.float(), labels)


def pmg_loss(adv_sim, orig_adv_sim, clean_sim, labels, logit_scale=100.0):
    """PMG-AFT: TeCoA's cross-entropy plus KL(p_θorig(x_adv) ‖ p_θ(x_adv)) + KL(p_θ(x) ‖ p_θ(x_adv)), weights 1.

    adv_sim:      (B, C) s(f_θ(x_adv), T) of the model being trained.
    orig_adv_sim: (B, C) s(f_θorig(x_adv), T) of the frozen original model (a constant).
    clean_sim:    (B, C) s(f_θ(x), T) of the model being trained on clean x (gradients flow through it).
    Each KL is summed over the classes and averaged over the batch."""
    log_p_adv = F.log_softmax(logit_scale * adv_sim.float(), dim=-1)
    log_p_orig = F.log_softmax(logit_scale * orig_adv_sim.detach().float(), dim=-1)
    log_p_clean = F.log_softmax(logit_scale * clean_sim.float(), dim=-1)
    kl_orig = (log_p_orig.exp() * (log_p_orig - log_p_adv)).sum(-1).mean()  # KL(p_θorig(x_adv) ‖ p_θ(x_adv))
    kl_clean = (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(-1).mean()  # KL(p_θ(x) ‖ p_θ(x_adv))
    return tecoa_loss(adv_sim, labels, logit_scale) + kl_orig + kl_clean


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    parser = common.train_parser(__doc__, "tecoa", lr=1e-5)
    parser.add_argument("--pmg", action="store_true",
                        help="PMG-AFT: add KL(p_orig(x_adv)‖p(x_adv)) + KL(p(x)‖p(x_adv)) to TeCoA's loss")
    parser.set_defaults(method="pmg-aft" if parser.parse_known_args(argv)[0].pmg else "tecoa")  # names runs, table
    return common.parse_train_args(parser, argv, demo_defaults=dict(lr=1e-3))


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
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps,
                                                                                     args.epochs * steps_per_epoch)
    step = run.start(clip_model, optimizer, scaler, total_steps, steps_per_epoch)  # resumes from last.pt, if any
    before = common.demo_evaluate(orig_encoder, clip_model, dist, ctx, args, run, "before") if args.data == "demo" else None
    encoder, orig_encoder = (common.compile_encoder(e, args.compile) for e in (encoder, orig_encoder))  # --compile
    train_encoder = DDP(encoder) if dist.world > 1 else encoder
    loader = common.make_loader(dataset, sampler, args.workers, device)
    run.print(f"{args.method.upper()}: {len(dataset)} images, {len(text)} classes, {total_steps} steps of global batch "
              f"{args.batch_size} on {dist.world} process(es), {device}, amp {amp}")

    # ------------------------------------------------------------------------------------------------- training
    run.start_timer(step)
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=step % steps_per_epoch)
        for images, labels, unreadable in common.progress(loader, dist, desc=f"epoch {epoch}", total=len(sampler)):
            lr = common.cosine_lr(step, args.lr, args.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)  # (b, 3, H, W) in [0, 1], b = batch_size / world
            labels = labels.to(device, non_blocking=True)  # (b,)

            # --- TeCoA: PGD on the hard-label CE (Eq. 4-5); PMG-AFT attacks the same CE and adds its KL terms ---
            def attack_loss(x):
                with ctx:
                    return tecoa_loss(common.cosine_sim(encoder(x), text), labels)

            encoder.eval()
            delta = common.random_start((args.batch_size, *images.shape[1:]), eps, args.seed, step, dist.rank,
                                        dist.world, device)
            x_adv = common.pgd(attack_loss, images, eps, alpha, args.attack_steps, delta)  # inner max, Eq. 5
            encoder.train()
            with ctx:
                adv_sim = common.cosine_sim(train_encoder(x_adv), text)  # (b, C)
                if args.pmg:
                    with torch.no_grad():
                        orig_adv_sim = common.cosine_sim(orig_encoder(x_adv), text)  # (b, C) original model
                    clean_sim = common.cosine_sim(train_encoder(images), text)  # (b, C), not detached
                    loss = pmg_loss(adv_sim, orig_adv_sim, clean_sim, labels)
                else:
                    loss = tecoa_loss(adv_sim, labels)
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
