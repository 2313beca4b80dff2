"""AdvFLYP: Adversarial Finetuning Like You Pretrain, CLIP's image encoder on web image-caption pairs.

Paper: Xing et al., "Finetune Like You Pretrain: Boosting Zero-shot Adversarial Robustness in Vision-language
Models" (arXiv 2604.11576), Eq. 1, 6-13 and Algorithm 1. Defaults and choices: docs/methods.md, docs/advflyp.md.
The image encoder f_θ is fine-tuned with CLIP's own contrastive loss on adversarial images of a batch of N web
image-caption pairs, the batch's perturbations optimised jointly against that batch loss; the text encoder is frozen:

    S      = 100 · s(f_θ(x_i + δ_i), t_j)                                   (N, N) image i vs caption j
    L_CLIP = (CE(S, arange N) + CE(Sᵀ, arange N)) / 2                         (Eq. 1)
    δ_adv  = argmax_{‖δ_i‖∞ ≤ ε} L_CLIP                                        (Eq. 6, jointly over the batch: PGD-2)
    min_θ L_CLIP(x + δ_adv) [+ L_logit + L_feat]                               (Eq. 7; Eq. 13 with --reg full)

    L_feat  = mean_i ‖x̂_adv,θ − x̂_adv,orig‖₂ + mean_i ‖x̂_adv,θ − x̂_clean,θ‖₂    (Eq. 8, unit-norm features)
    L_logit = mean_i KL(P_adv,θ ‖ P_adv,orig) + KL(P_adv,θ ‖ P_clean,θ)          (Eq. 9-12, P: row softmax of
                                                                                  100 · s over the batch's captions)
Under DDP the batch is the global one: features are gathered across processes for the loss and for the attack.

Reproduce the paper's main row (ViT-B/32, 1M LAION pairs, ε = 1/255, AdvFLYP_full, lr 1e-4, batch 256):
    torchrun --nproc_per_node=2 advflyp.py --eps 1 --data /path/to/laion1m --out runs/advflyp-eps1
    python advflyp.py --eps 1 --data /path/to/laion1m --out runs/advflyp-eps1      # one process
    (the paper early-stops on TinyImageNet robust accuracy: add --patience 10 --val-data TinyImageNet --val-root ./data)
The paper's ablations (every table's commands: docs/reproduce.md):
    --train text | all          fine-tune the text encoder too, or every parameter (Table 6)
    --reg-terms orig | clean    each regulariser's deviation from the original model, or from the clean image,
                                alone (Table 7's AdvFLYP_2nd, in its two readings)
    --class-captions            'naive FLYP': a labelled image tree, class prompts as captions (Table 8)
    --subset N, --eps 0         part of the data (Figure 3, Tables 7, 12, 13); clean fine-tuning (Table 13)
The demo (no download, a few minutes on a CPU):
    python advflyp.py --demo
Benchmark (no dataset, no weights: images/s, s/step and peak memory go to the run's log.jsonl):
    python advflyp.py --model random:ViT-B/32 --data synthetic --max-steps 30      # batch 256, logged every 10 steps
Re-running a command with the same --out resumes from its last.pt.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common

REGULARISERS = ("none", "logit", "feat", "full")
TRAINED = ("image", "text", "all")
TRAINED_WHAT = {"image": "the image encoder", "text": "the image and text encoders", "all": "every parameter"}


# ------------------------------------------------------------------------------------- the method (Eq. 1, 6-13)
def contrastive_loss(image_features, text_features, logit_scale=100.0):
    """CLIP's symmetric InfoNCE over a batch of N pairs (Eq. 1): image i and caption i match, the rest are negatives.

    image_features: (N, D) raw f(x_i); text_features: (N, D) g(t_i) (normalised here either way)."""
    logits = logit_scale * common.cosine_sim(image_features, F.normalize(text_features.float(), dim=-1))  # (N, N)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def logit_reg(adv_features, orig_adv_features, clean_features, text_features, logit_scale=100.0):
    """L_logit (Eq. 9-12): mean_i [KL(P_adv,θ ‖ P_adv,orig) + KL(P_adv,θ ‖ P_clean,θ)], each P the row softmax over
    the text features' rows (the batch's captions; tecoa.py --reg: the class prompts) at logit_scale.
    adv_features, orig_adv_features, clean_features: (N, D) raw; text_features: (M, D). The frozen model's
    orig_adv_features are a constant; the clean branch keeps its gradient (official code). None drops a term (the
    paper's Table 7): clean_features=None the second, (i) (--reg-terms orig), orig_adv_features=None the first, (ii)
    (--reg-terms clean)."""
    text = F.normalize(text_features.float(), dim=-1)
    log_p_adv = F.log_softmax(logit_scale * common.cosine_sim(adv_features, text), dim=-1)  # Eq. 9, (N, M)
    p_adv = log_p_adv.exp()
    kl = torch.zeros(len(adv_features), device=adv_features.device)  # (N,)
    if orig_adv_features is not None:
        log_p_orig = F.log_softmax(logit_scale * common.cosine_sim(orig_adv_features.detach(), text), dim=-1)  # Eq. 10
        kl = kl + (p_adv * (log_p_adv - log_p_orig)).sum(-1)  # (N,) KL(P_adv,θ ‖ P_adv,orig), term (ii)
    if clean_features is not None:
        log_p_clean = F.log_softmax(logit_scale * common.cosine_sim(clean_features, text), dim=-1)  # Eq. 11
        kl = kl + (p_adv * (log_p_adv - log_p_clean)).sum(-1)  # (N,) + KL(P_adv,θ ‖ P_clean,θ), term (i)
    return kl.mean()  # Eq. 12


def feature_reg(adv_features, orig_adv_features, clean_features):
    """L_feat (Eq. 8 as in the official code): mean_i ‖x̂_adv,θ − x̂_adv,orig‖₂ + mean_i ‖x̂_adv,θ − x̂_clean,θ‖₂ on
    L2-normalised features, unsquared. All (N, D) raw; orig_adv_features is a constant. None drops a term, as in
    logit_reg: clean_features=None the second ((i); --reg-terms orig), orig_adv_features=None the first ((ii);
    --reg-terms clean)."""
    adv = F.normalize(adv_features.float(), dim=-1)
    loss = torch.zeros((), device=adv.device)
    if orig_adv_features is not None:
        orig = F.normalize(orig_adv_features.detach().float(), dim=-1)
        loss = loss + (adv - orig).norm(dim=-1).mean()  # term (ii): the deviation from the original model
    if clean_features is not None:
        loss = loss + (adv - F.normalize(clean_features.float(), dim=-1)).norm(dim=-1).mean()  # term (i)
    return loss


class TextEncoder(nn.Module):
    """CLIP's text encoder g_φ as a module of its own (--train text|all), so that DDP sees its passes and averages
    its gradients: it holds the text modules and parameters of `clip_model`, which it shares (training it trains
    them), and its forward is CLIP.encode_text itself: tokens (N, L) -> (N, D) raw text features. Its parameters are
    every parameter of CLIP outside the image encoder except logit_scale."""

    def __init__(self, clip_model):
        super().__init__()
        self.token_embedding, self.transformer, self.ln_final = (clip_model.token_embedding, clip_model.transformer,
                                                                 clip_model.ln_final)
        self.positional_embedding, self.text_projection = clip_model.positional_embedding, clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, tokens):
        return common.CLIP.encode_text(self, tokens)  # reads only the attributes set above


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    parser = common.train_parser(__doc__, "advflyp", lr=1e-4, data="./data/laion1m", data_help=(
        "the AdvFLYP LAION release (partX/images, partX/captions, laion_index.json), a .json/.jsonl of "
        "{image, caption} records, a CSV/TSV of image paths and captions, an img2dataset output folder ('files' "
        "format), 'synthetic' or 'demo'; with --class-captions an ImageNet root or ImageFolder"))
    parser.add_argument("--reg", default="full", help="regulariser of Eq. 13: none | logit | feat | full (both)")
    parser.add_argument("--reg-terms", choices=["both", "orig", "clean"], default="both",
                        help="terms of each regulariser: both; orig, the deviation from the original model alone "
                             "(what the paper defines as term (ii) of Eq. 8 and Eq. 12: its Table 7's AdvFLYP_2nd); "
                             "clean, the adversarial-vs-clean deviation alone (the second term by position: the other "
                             "reading of Table 7, docs/advflyp.md)")
    parser.add_argument("--train", choices=TRAINED, default="image",
                        help="what is fine-tuned: image (f_θ, the paper's method), text (f_θ and the text encoder) or "
                             "all (every parameter, logit_scale too, clamped to ln 100 as the official code does); "
                             "the paper's Table 6")
    parser.add_argument("--class-captions", action="store_true",
                        help="'naive FLYP' (the paper's Table 8): --data is a labelled image tree (ImageNet root or "
                             "ImageFolder, as tecoa.py reads it) and each image's caption is its class prompt 'This "
                             "is a photo of a {class}.'")
    parser.add_argument("--csv-img-key", default="filepath", help="image-path column of a CSV/TSV --data")
    parser.add_argument("--csv-caption-key", default="title", help="caption column of a CSV/TSV --data")
    parser.add_argument("--csv-separator", default=None, help="CSV/TSV separator (default: ',' for .csv, else tab)")
    parser.add_argument("--patience", type=int, default=0,
                        help="early stopping: stop after this many epochs without a better validation PGD accuracy "
                             "and keep the best weights (0: off; the paper uses 10)")
    parser.add_argument("--val-data", default=None,
                        help="validation set of --patience: TinyImageNet (as in the paper, under --val-root in "
                             "evaluate.py's layout), an ImageFolder directory, or 'demo' (the default with "
                             "--data demo)")
    parser.add_argument("--val-root", default="./data",
                        help="where --val-data TinyImageNet lies (evaluate.py's layout)")
    parser.add_argument("--val-size", type=int, default=1000, help="validation images (a fixed random subset)")
    parser.add_argument("--val-steps", type=int, default=10, help="PGD steps of the validation attack (α = 1/255)")
    args = common.parse_train_args(parser, argv, check_data=False)
    if args.reg not in REGULARISERS:
        raise common.UsageError(f"--reg {args.reg}: must be one of {', '.join(REGULARISERS)}")
    if args.class_captions:
        if args.data not in ("synthetic", "demo") and not os.path.isdir(args.data):
            raise common.UsageError(f"--class-captions --data {args.data}: no such directory (an ImageNet root or "
                                    "an ImageFolder directory, 'synthetic' or 'demo')")
    elif args.data not in ("synthetic", "demo") and not os.path.exists(args.data):
        raise common.UsageError(f"--data {args.data}: no such file or directory (a CSV/TSV of image paths and "
                                "captions, a .json/.jsonl of records, an img2dataset output folder, the AdvFLYP LAION "
                                "release, 'synthetic' or 'demo')")
    if args.reg_terms != "both" and args.reg == "none":
        raise common.UsageError(f"--reg-terms {args.reg_terms}: there is no regulariser (--reg none)")
    if args.patience < 0 or args.val_size < 1 or args.val_steps < 1:
        raise common.UsageError("--patience must be >= 0, --val-size and --val-steps >= 1")
    if args.patience and args.val_data is None:
        if args.data != "demo":
            raise common.UsageError("--patience needs --val-data (e.g. TinyImageNet, or an ImageFolder directory)")
        args.val_data = "demo"
    return args


def validation_set(args, resolution):
    """(dataset, class prompts) of early stopping. 'demo': fresh images of the demo's held-out concepts (seed 3; its
    reported test images are seed 2); otherwise a fixed random subset of an evaluate.py dataset or ImageFolder."""
    if args.val_data == "demo":
        ds = common.DemoImages(common.DEMO_HELD_OUT, 32, resolution, seed=3)
        return ds, common.prompts_for(ds.classes)
    _, ds, names, template = common.validation_dataset(args.val_data, args.val_root, resolution, args.class_names)
    if len(names) < 2:
        raise common.UsageError(f"--val-data {args.val_data}: has {len(names)} class, zero-shot needs at least 2")
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.val_size]
    return torch.utils.data.Subset(ds, sorted(keep.tolist())), common.prompts_for(names, template)


def main(argv=None):
    args = parse_args(argv)
    eps, alpha = args.eps / 255, args.alpha / 255

    # ------------------------------------------------------------------------------- model, data, run directory
    dist = common.setup_distributed()
    amp, ctx, scaler = common.amp_setup(args.amp, dist.device)
    clip_model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    resolution = clip_model.visual.input_resolution
    log = print if dist.is_main else None
    if args.class_captions:  # 'naive FLYP': labelled images, each captioned with its class prompt
        labelled, names = common.training_dataset(args.data, resolution, args.class_names, args.synthetic_size,
                                                  args.seed)
        dataset = common.SkipUnreadable(common.Captioned(labelled.dataset, common.prompts_for(names)))
    else:
        dataset = common.caption_dataset(args.data, resolution, args.csv_img_key, args.csv_caption_key,
                                         args.csv_separator, args.synthetic_size, args.seed, log=log)
    dataset = common.take_subset(dataset, args, log)  # --subset, --subset-per-class
    val_set, val_prompts = validation_set(args, resolution) if args.patience else (None, None)
    sampler = common.GlobalBatchSampler(len(dataset), args.batch_size, dist.rank, dist.world, args.seed)
    run = common.Run(args, dist, len(dataset))  # nothing is written before this point
    device = dist.device

    clip_model.to(device).requires_grad_(False)
    val_text = common.text_features(clip_model, val_prompts, device) if args.patience else None  # (C_val, D)
    encoder = common.ImageEncoder(clip_model.visual).to(device)  # f_θ, trained
    orig_encoder = common.frozen_copy(encoder)  # f_θorig, frozen before any update
    text_encoder = TextEncoder(clip_model) if args.train != "image" else None  # g_φ, trained with --train text|all
    trained = list(clip_model.visual.parameters())  # --train image: f_θ alone
    if args.train != "image":  # the paper's Table 6: g_φ too (text), and logit_scale (all)
        trained += list(text_encoder.parameters()) + ([clip_model.logit_scale] if args.train == "all" else [])
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = common.schedule_steps(args, steps_per_epoch)  # --epochs, capped by --max-steps
    best_path = os.path.join(run.dir, "best.pt")
    step = run.start(clip_model, optimizer, scaler, total_steps, steps_per_epoch)  # resumes from last.pt, if any
    early = run.checkpoint["early_stop"] if run.checkpoint else {"best": -1.0, "best_step": 0, "bad_epochs": 0,
                                                                 "stopped": False}  # --patience state
    before = (common.demo_evaluate(orig_encoder, clip_model, dist, ctx, args, run, "before") if args.data == "demo"
              else None)
    encoder, orig_encoder = (common.compile_encoder(e, args.compile) for e in (encoder, orig_encoder))  # --compile
    train_encoder = DDP(encoder) if dist.world > 1 else encoder
    train_text = DDP(text_encoder) if text_encoder is not None and dist.world > 1 else text_encoder
    loader = common.make_loader(dataset, sampler, args.workers, device)
    gather = lambda f: common.all_gather_with_grad(f.float(), dist)  # noqa: E731  (b, D) -> (B, D), the global batch
    run.print(f"AdvFLYP (reg {args.reg}" + {"both": "", "orig": ", term (ii) only: the deviation from the original",
                                            "clean": ", the adversarial-vs-clean term only"}[args.reg_terms]
              + f", training {TRAINED_WHAT[args.train]}): {len(dataset)} image-caption pairs"
              + (" (class prompts as captions)" if args.class_captions else "")
              + f", {common.count(total_steps, 'step')} of global batch {args.batch_size} on {dist.world} "
              f"process(es), {device}, amp {amp}")

    def validate(step):  # --patience: early stopping on the validation set's PGD accuracy, at each epoch's end
        text = val_text if text_encoder is None else common.text_features(clip_model, val_prompts, device)  # g_φ now
        val = common.zero_shot_accuracy(encoder, text, val_set, dist, eps, 1 / 255, args.val_steps, ctx=ctx,
                                        seed=args.seed, workers=args.workers)
        if val["pgd"] > early["best"]:
            early.update(best=val["pgd"], best_step=step, bad_epochs=0)
            if dist.is_main:
                common.atomic_save({"model": clip_model.state_dict(), "step": step, "val": val}, best_path)
        else:
            early["bad_epochs"] += 1
        early["stopped"] = early["bad_epochs"] >= args.patience
        run.log({"step": step, "epoch": (step - 1) // steps_per_epoch, "val": val, **early})
        run.print(f"step {step}: validation {val}, best PGD {early['best']} at step {early['best_step']}"
                  + (", early stop" if early["stopped"] else ""))

    # ------------------------------------------------------------------------------------------------- training
    run.start_timer(step)
    while step < total_steps and not early["stopped"]:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=step % steps_per_epoch)
        for images, captions, unreadable in common.progress(loader, dist, desc=f"epoch {epoch}", total=len(sampler)):
            lr = common.cosine_lr(step, args.lr, args.warmup, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)  # (b, 3, H, W) in [0, 1], b = batch_size / world
            if text_encoder is None:  # g_φ frozen
                text = gather(common.text_features(clip_model, list(captions), device))  # (B, D) the batch's captions
            else:  # g_φ trained: its features keep their graph for the update; the attack sees them as constants
                tokens = common.tokenize(clip_model, list(captions)).to(device)  # (b, L)
                with ctx:
                    text = gather(F.normalize(train_text(tokens).float(), dim=-1))  # (B, D)
            scale = clip_model.logit_scale.exp() if args.train == "all" else common.CLIP_LOGIT_SCALE  # fixed: 100
            attack_scale = float(scale.item() if torch.is_tensor(scale) else scale)  # a constant for the attack

            # --- AdvFLYP: the batch's perturbations jointly maximise the batch's contrastive loss (Eq. 6) ---
            def attack_loss(x):
                with ctx:  # one loss of the whole global batch
                    return contrastive_loss(gather(encoder(x)), text.detach(), attack_scale)

            encoder.eval()
            delta = common.random_start((args.batch_size, *images.shape[1:]), eps, args.seed, step, dist.rank,
                                        dist.world, device)
            x_adv = common.pgd(attack_loss, images, eps, alpha, args.attack_steps, delta)  # inner max, Eq. 6
            encoder.train()
            with ctx:
                adv = gather(train_encoder(x_adv))  # (B, D) f_θ(x + δ)
                loss = contrastive_loss(adv, text, scale)  # Eq. 7
                if args.reg != "none":
                    # (B, D) f_θ(x), not detached (official code); not needed without term (i)
                    clean = gather(train_encoder(images)) if args.reg_terms != "orig" else None
                    with torch.no_grad():  # (B, D) f_θorig(x + δ); not needed without term (ii)
                        orig = gather(orig_encoder(x_adv)) if args.reg_terms != "clean" else None
                    if args.reg in ("logit", "full"):
                        loss = loss + logit_reg(adv, orig, clean, text, scale)  # Eq. 9-12
                    if args.reg in ("feat", "full"):
                        loss = loss + feature_reg(adv, orig, clean)  # Eq. 8; the sum is Eq. 13
            # --------------------------------------------------------------------------------------------------

            optimizer.zero_grad(set_to_none=True)
            # Each process back-propagates through its own rows of the global batch and DDP averages the gradients:
            # scaling by the number of processes makes that average the gradient of the global loss.
            scaler.scale(loss * dist.world).backward()
            if args.train == "all":  # logit_scale is in no DDP module: every process holds world × the same gradient
                clip_model.logit_scale.grad /= dist.world
            scaler.step(optimizer)
            scaler.update()
            if args.train == "all":
                with torch.no_grad():  # as the official code (and CLIP's pretraining): the scale stays at most 100
                    clip_model.logit_scale.clamp_(0, math.log(common.CLIP_LOGIT_SCALE))
            step += 1
            run.step_done(step, loss, lr, unreadable, extra={"early_stop": early},  # log, check, checkpoint; stops
                          epoch_end=validate if args.patience else None)  # after a preemption signal
            if step >= total_steps or early["stopped"]:
                break

    # ---------------------------------------------------------------------------------------------------- results
    if args.patience:  # keep the best validated weights (best.pt is written by rank 0: wait for it)
        if dist.world > 1:
            torch.distributed.barrier()
        if os.path.isfile(best_path):
            clip_model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
            run.print(f"model.pt: the weights of step {early['best_step']} (validation PGD {early['best']})")
    run.write_model(clip_model)
    if before is not None:
        after = common.demo_evaluate(encoder, clip_model, dist, ctx, args, run, "after")
        common.demo_report(run, args, before, after)
    run.print(f"done: {run.dir}/model.pt")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
