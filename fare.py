"""FARE: unsupervised adversarial fine-tuning of CLIP's image encoder, with no labels and no text.

Paper: Schlarmann, Singh, Croce, Hein, "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for
Robust Large Vision-Language Models", ICML 2024 (arXiv 2402.12336), Eq. 3-4; official code chs20/RobustVLM; a
baseline of the AdvFLYP paper (arXiv 2604.11576). Defaults and choices: docs/methods.md, docs/fare.md.
The image encoder f_θ is trained so that its embedding of an adversarial image stays where the original encoder put
the clean image. The loss is on the raw (unnormalised) embeddings; no class prompt or caption is used:

    L_FARE(θ; x) = max_{‖x_adv − x‖∞ ≤ ε} ‖f_θ(x_adv) − f_θorig(x)‖₂²    (Eq. 3; f_θorig frozen, on clean x)
    min_θ mean_i L_FARE(θ; x_i)                                         (Eq. 4; inner max: PGD-10, α = 1/255)

Reproduce the AdvFLYP paper's FARE row (ViT-B/32, ImageNet, ε = 1/255; the FARE authors' AdamW lr 1e-5, weight
decay 1e-4, cosine with 1400 warm-up steps, batch 128, 20 000 steps = 2 epochs of ImageNet):
    torchrun --nproc_per_node=2 fare.py --eps 1 --data /path/to/imagenet --out runs/fare-eps1
    python fare.py --eps 1 --data /path/to/imagenet --out runs/fare-eps1      # one process
FARE² and FARE⁴ of the FARE paper (ε = 2/255 and 4/255; the paper's backbone is ViT-L/14):
    torchrun --nproc_per_node=2 fare.py --eps 2 --data /path/to/imagenet --out runs/fare-eps2
    torchrun --nproc_per_node=2 fare.py --eps 4 --model ViT-L/14 --data /path/to/imagenet --out runs/fare4-vitl14
Without ImageNet: any folder of images, or advflyp.py's web data (captions are not read):
    python fare.py --data data/laion1m.csv --epochs 100 --out runs/fare-web    # 20 000 steps (--max-steps caps)
The demo (no download, a few minutes on a CPU):
    python fare.py --demo
Benchmark (no dataset, no weights: images/s, s/step and peak memory go to the run's log.jsonl):
    python fare.py --model random:ViT-B/32 --data synthetic --max-steps 30      # batch 128, logged every 10 steps
Re-running a command with the same --out resumes from its last.pt.
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common


# ---------------------------------------------------------------------------------------------- the method (Eq. 3-4)
def fare_loss(adv_features, orig_features):
    """FARE's embedding loss (Eq. 3): the squared L2 distance between the raw (unnormalised) embeddings of the model
    being trained and of the original model, summed over the embedding dimension, averaged over the batch.

    adv_features:  (B, D) f_θ(x_adv) of the model being trained.
    orig_features: (B, D) f_θorig(x) of the frozen original model on clean x (a constant).
    Returns mean_i Σ_d (f_θ(x_adv)[i, d] − f_θorig(x)[i, d])²."""
    diff = adv_features.float() - orig_features.detach().float()  # (B, D), fp32 under AMP
    return diff.pow(2).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    parser = common.train_parser(
        __doc__, "fare", class_names=False, lr=1e-5, optimizer="AdamW", weight_decay=1e-4, warmup=1400, batch_size=128,
        epochs=2, max_steps=20_000, attack_steps=10, alpha=1.0, data_help=(
            "ImageNet root (its train/), any folder of images (ImageFolder, img2dataset output: every image under it), "
            "a CSV/TSV with an image-path column, 'synthetic' or 'demo'; labels and captions are not read"))
    parser.add_argument("--csv-img-key", default="filepath", help="image-path column of a CSV/TSV --data")
    parser.add_argument("--csv-separator", default=None, help="CSV/TSV separator (default: ',' for .csv, else tab)")
    args = common.parse_train_args(parser, argv, check_data=False)
    if args.data not in ("synthetic", "demo") and not os.path.exists(args.data):
        raise common.UsageError(f"--data {args.data}: no such file or directory (a folder of images, a CSV/TSV of "
                                "image paths, 'synthetic' or 'demo')")
    return args


def main(argv=None):
    args = parse_args(argv)
    eps, alpha = args.eps / 255, args.alpha / 255

    # ------------------------------------------------------------------------------- model, data, run directory
    dist = common.setup_distributed()
    amp, ctx, scaler = common.amp_setup(args.amp, dist.device)
    clip_model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    resolution = clip_model.visual.input_resolution
    dataset, source = common.image_dataset(args.data, resolution, args.csv_img_key, args.csv_separator,
                                           args.synthetic_size, args.seed)
    dataset = common.take_subset(dataset, args, print if dist.is_main else None)  # --subset, --subset-per-class
    sampler = common.GlobalBatchSampler(len(dataset), args.batch_size, dist.rank, dist.world, args.seed)
    run = common.Run(args, dist, len(dataset))  # nothing is written before this point
    device = dist.device

    clip_model.to(device).requires_grad_(False)
    encoder = common.ImageEncoder(clip_model.visual).to(device)  # f_θ, trained
    orig_encoder = common.frozen_copy(encoder)  # f_θorig, frozen before any update
    clip_model.visual.requires_grad_(True)
    # AdamW with PyTorch's default betas (0.9, 0.999) and eps 1e-8, decoupled weight decay on every parameter of the
    # image encoder, as the FARE authors' code
    optimizer = torch.optim.AdamW(clip_model.visual.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = common.schedule_steps(args, steps_per_epoch)  # --epochs, capped by --max-steps
    step = run.start(clip_model, optimizer, scaler, total_steps, steps_per_epoch)  # resumes from last.pt, if any
    before = (common.demo_evaluate(orig_encoder, clip_model, dist, ctx, args, run, "before") if args.data == "demo"
              else None)
    encoder, orig_encoder = (common.compile_encoder(e, args.compile) for e in (encoder, orig_encoder))  # --compile
    train_encoder = DDP(encoder) if dist.world > 1 else encoder
    loader = common.make_loader(dataset, sampler, args.workers, device)
    run.print(f"FARE: {len(dataset)} images ({source}), {common.count(total_steps, 'step')} of global batch "
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

            # --- FARE: PGD drives f_θ(x_adv) away from the original clean embedding (Eq. 3), the update pulls it in ---
            with torch.no_grad(), ctx:
                orig = orig_encoder(images)  # (b, D) f_θorig(x): raw embeddings of the original model, clean x

            def attack_loss(x):
                with ctx:
                    return fare_loss(encoder(x), orig)

            encoder.eval()
            delta = common.random_start((args.batch_size, *images.shape[1:]), eps, args.seed, step, dist.rank,
                                        dist.world, device)
            x_adv = common.pgd(attack_loss, images, eps, alpha, args.attack_steps, delta)  # inner max, Eq. 3
            encoder.train()
            with ctx:
                # Eq. 4. A mean over this process's b images; DDP averages the gradients over the processes, which
                # is the gradient of the mean over the global batch (equal shares), so no rescaling is needed.
                loss = fare_loss(train_encoder(x_adv), orig)
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
