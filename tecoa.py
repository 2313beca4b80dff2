"""TeCoA: adversarial fine-tuning of CLIP's image encoder with hard-label cross-entropy; PMG-AFT with --pmg; TGA-ZSR
with --tga.

Papers: TeCoA (Mao et al., ICLR 2023) as written in the AGFT paper (arXiv 2603.29410), Eq. 4-5; PMG-AFT (Wang et al.,
CVPR 2024) as described in AGFT §6 / Table 11; TGA-ZSR (Yu et al., NeurIPS 2024, "Text-Guided Attention is All You
Need for Zero-Shot Robustness in Vision-Language Models"; official code zhyblue424/TGA-ZSR). Defaults and
choices: docs/methods.md, docs/tecoa.md.
The image encoder f_θ is trained to classify adversarial images into their ImageNet class prompts T:

    L_CE   = −mean_i log softmax(100 · s(f_θ(x_adv), T))[i, y_i]             (Eq. 4)
    min_θ E_x [ max_{x_adv ∈ B(x, ε)} L_CE ]                               (Eq. 5, inner max: PGD-2, α = ε)

PMG-AFT adds two KL terms, weight 1 each, all at scale 100, with p(·) = softmax(100 · s(·, T)):

    L_PMG  = L_CE + KL(p_θorig(x_adv) ‖ p_θ(x_adv)) + KL(p_θ(x) ‖ p_θ(x_adv))
    (f_θorig frozen, under no_grad; the clean term p_θ(x) is not detached.) Its inner max is TeCoA's: PGD on L_CE,
    as in the PMG-AFT authors' code.

TGA-ZSR adds two terms on text-guided attention maps (ViT backbones only). With z_0..z_P(x) the embeddings of the
class token and the P patch tokens (ln_post and proj applied to every token, common.vit_forward) and t_y the text
embedding of the image's own class prompt:

    a_j(x) = < z_j(x) / ‖z_·,d(x)‖ , t_y >,  j = 1..P        (‖·‖ along the token axis, per feature d: official code)
    A(x)   = bilinear upsampling to R × R of the √P × √P grid of (a − min_j a) / (max_j a − min_j a)
    L_AR   = mean_i ‖A_θ(x_adv,i) − A_orig(x_i)‖₂                                   (attention refinement, Eq. 6)
    L_AMC  = mean_i ‖A_θ(x_i) − A_orig(x_i)‖₂                                 (attention-based model constraint, Eq. 7)
    L_TGA  = L_CE + 0.08 · L_AR + 0.05 · L_AMC
    (‖·‖₂ over the R² pixels of a map; A_orig from f_θorig under no_grad; A_θ(x) keeps its gradient.) Its inner max is
    TeCoA's: PGD on L_CE, as in the official code. Default lr 4e-5 (AGFT Table 11, its TGA-ZSR rows).

Reproduce the paper's rows (ViT-B/32, ImageNet, ε = 1/255, lr 1e-5 (TGA-ZSR: 4e-5), 10 epochs, batch 256):
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --data /path/to/imagenet --out runs/tecoa-eps1
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --pmg --data /path/to/imagenet --out runs/pmg-aft-eps1
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --tga --data /path/to/imagenet --out runs/tga-zsr-eps1
    python tecoa.py --eps 1 --data /path/to/imagenet --out runs/tecoa-eps1      # one process
TeCoA with AdvFLYP's regularisers (the AdvFLYP paper's Table 9; --reg logit is not --pmg: docs/tecoa.md):
    torchrun --nproc_per_node=2 tecoa.py --eps 1 --reg full --data /path/to/imagenet --out runs/tecoa-reg-full
The demo (no download, a few minutes on a CPU):
    python tecoa.py --demo
    python tecoa.py --demo --pmg
    python tecoa.py --demo --tga
Benchmark (no dataset, no weights: images/s, s/step and peak memory go to the run's log.jsonl):
    python tecoa.py --model random:ViT-B/32 --data synthetic --max-steps 30      # batch 256, logged every 10 steps
    python tecoa.py --model random:ViT-B/32 --data synthetic --max-steps 30 --tga
Re-running a command with the same --out resumes from its last.pt.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common


# ---------------------------------------------------------------------- the method (Eq. 4-5, PMG-AFT, TGA-ZSR)
REG_NAMES = {"none": "", "logit": " + L_logit", "feat": " + L_feat", "full": " + L_logit + L_feat"}  # --reg


# AdvFLYP's two regularisers (the AdvFLYP paper, Eq. 8-12; advflyp.py), over the class prompts here (--reg, its
# Table 9). A copy of advflyp.py's, so that this file reads alone (tests/test_tecoa.py checks that the two agree).
def logit_reg(adv_features, orig_adv_features, clean_features, text_features, logit_scale=100.0):
    """L_logit = mean_i [KL(P_adv,θ ‖ P_adv,orig) + KL(P_adv,θ ‖ P_clean,θ)], each P the softmax over the class
    prompts at logit_scale. adv/orig_adv/clean features (b, D) raw, orig_adv a constant; text_features (C, D)."""
    text = F.normalize(text_features.float(), dim=-1)
    log_p_adv = F.log_softmax(logit_scale * common.cosine_sim(adv_features, text), dim=-1)  # Eq. 9, (b, C)
    log_p_orig = F.log_softmax(logit_scale * common.cosine_sim(orig_adv_features.detach(), text), dim=-1)  # Eq. 10
    log_p_clean = F.log_softmax(logit_scale * common.cosine_sim(clean_features, text), dim=-1)  # Eq. 11
    p_adv = log_p_adv.exp()
    return ((p_adv * (log_p_adv - log_p_orig)).sum(-1) + (p_adv * (log_p_adv - log_p_clean)).sum(-1)).mean()  # Eq. 12


def feature_reg(adv_features, orig_adv_features, clean_features):
    """L_feat = mean_i ‖x̂_adv,θ − x̂_adv,orig‖₂ + mean_i ‖x̂_adv,θ − x̂_clean,θ‖₂ on L2-normalised features (Eq. 8
    as in the official code), unsquared; orig_adv a constant."""
    adv = F.normalize(adv_features.float(), dim=-1)
    orig = F.normalize(orig_adv_features.detach().float(), dim=-1)
    return (adv - orig).norm(dim=-1).mean() + (adv - F.normalize(clean_features.float(), dim=-1)).norm(dim=-1).mean()


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


def text_guided_attention(token_features, text_features, labels, size):
    """TGA-ZSR's text-guided attention map of each image for its own class, as the official code computes it.

    token_features: (B, 1 + P, D) embeddings of the class token and the P patch tokens (common.vit_forward).
    text_features:  (C, D) L2-normalised class-prompt embeddings; labels: (B,) class indices.
    size:           the model's input resolution R: the maps are upsampled to R × R.
    Returns (B, R·R) maps in [0, 1], flattened row-major."""
    dtype = torch.promote_types(token_features.dtype, torch.float32)  # fp32 at least (the maps of bf16 tokens too)
    z = token_features.to(dtype)
    z = z / z.norm(dim=1, keepdim=True)  # along the token axis (dim 1, class token included), as the official code does
    text = text_features.to(dtype)[labels]  # (B, D) each image's own class prompt
    scores = (z[:, 1:] * text[:, None, :]).sum(-1)  # (B, P); a product and a sum, so autocast leaves it in fp32
    lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
    scores = (scores - lo) / (hi - lo).clamp_min(torch.finfo(scores.dtype).tiny)  # min-max per image; 0 if constant
    side = math.isqrt(scores.shape[1])
    if side * side != scores.shape[1]:
        raise ValueError(f"{scores.shape[1]} patch tokens do not form a square grid")
    grid = scores.view(-1, 1, side, side)  # (B, 1, √P, √P), row-major as the patches are
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).flatten(1)  # (B, R·R)


TGA_FORMS = {  # --tga-form: the weights of L_AR and L_AMC, and each image's distance between two (B, R·R) maps
    "official": (0.08, 0.05, lambda a, b: (a - b).norm(dim=1)),  # the TGA-ZSR code: the L2 norm of the whole map
    "agft": (0.05, 0.08, lambda a, b: (a - b).abs().mean(dim=1)),  # the AGFT code: swapped, |a − b| per pixel, mean
}


def tga_loss(adv_sim, labels, att_adv, att_clean, att_orig, alpha=0.08, beta=0.05, logit_scale=100.0,
             distance=TGA_FORMS["official"][2]):
    """TGA-ZSR: TeCoA's cross-entropy + alpha · mean_i d(A_θ(x_adv), A_orig(x)) + beta · mean_i d(A_θ(x), A_orig(x)),
    d the L2 norm of the difference by default (--tga-form official; TGA_FORMS["agft"]: the AGFT authors' form).

    adv_sim:   (B, C) s(f_θ(x_adv), T) of the model being trained; labels: (B,) class indices.
    att_adv:   (B, R·R) A_θ(x_adv), the trained model's map of the adversarial image (text_guided_attention).
    att_clean: (B, R·R) A_θ(x), the trained model's map of the clean image (gradients flow through it).
    att_orig:  (B, R·R) A_orig(x), the frozen original model's map of the clean image (a constant).
    distance(a, b): (B,) per image; the official code's 'l2' is the L2 norm over the whole flattened map."""
    att_orig = att_orig.detach()
    refine = distance(att_adv, att_orig).mean()  # L_AR (Eq. 6): adversarial vs original attention
    constrain = distance(att_clean, att_orig).mean()  # L_AMC (Eq. 7): clean vs original attention
    return tecoa_loss(adv_sim, labels, logit_scale) + alpha * refine + beta * constrain


# --------------------------------------------------------------------------------------------------------- config
def parse_args(argv=None):
    parser = common.train_parser(__doc__, "tecoa", lr=None, lr_default="1e-5; 4e-5 with --tga")
    parser.add_argument("--pmg", action="store_true",
                        help="PMG-AFT: add KL(p_orig(x_adv)‖p(x_adv)) + KL(p(x)‖p(x_adv)) to TeCoA's loss")
    parser.add_argument("--reg", choices=tuple(REG_NAMES), default="none",
                        help="add AdvFLYP's regularisers to TeCoA's loss (the AdvFLYP paper's Table 9): logit "
                             "(L_logit over the class prompts), feat (L_feat), full (both); not with --pmg or --tga. "
                             "--reg logit is PMG-AFT as the AdvFLYP code computes it: its KLs run the other way "
                             "round from --pmg's (docs/tecoa.md)")
    parser.add_argument("--tga", action="store_true",
                        help="TGA-ZSR (ViT only): add 0.08·‖A(x_adv)−A_orig(x)‖ + 0.05·‖A(x)−A_orig(x)‖ on text-guided "
                             "attention maps to TeCoA's loss; default lr 4e-5")
    parser.add_argument("--tga-form", choices=tuple(TGA_FORMS), default="official",
                        help="--tga's terms: official (the TGA-ZSR code, above) or agft (the AGFT authors' code, whose "
                             "numbers the AGFT paper reports: weights swapped, 0.05 on the adversarial and 0.08 on the "
                             "clean term, each distance the mean |difference| per pixel; docs/tecoa.md)")

    def derive(args):
        if args.pmg + args.tga + (args.reg != "none") > 1:
            raise common.UsageError("--pmg, --tga and --reg: choose one (PMG-AFT, TGA-ZSR or TeCoA with AdvFLYP's "
                                    "regularisers)")
        if args.tga_form != "official" and not args.tga:
            raise common.UsageError(f"--tga-form {args.tga_form}: only with --tga")
        args.method = "pmg-aft" if args.pmg else "tga-zsr" if args.tga else "tecoa"  # names runs, the demo's table
        if args.lr is None:
            args.lr = 4e-5 if args.tga else 1e-5  # TGA-ZSR: AGFT Table 11
    return common.parse_train_args(parser, argv, derive=derive)


def main(argv=None):
    args = parse_args(argv)
    eps, alpha = args.eps / 255, args.alpha / 255

    # ------------------------------------------------------------------------------- model, data, run directory
    dist = common.setup_distributed()
    amp, ctx, scaler = common.amp_setup(args.amp, dist.device)
    clip_model = common.load_clip(args.model, args.seed, args.vision_weights, dist)
    if args.tga and not isinstance(clip_model.visual, common.VisionTransformer):  # before anything is written
        raise common.UsageError(f"--tga --model {args.model}: TGA-ZSR needs a ViT image encoder (patch tokens), "
                                "not a ResNet")
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
    run.print(f"{common.METHOD_NAMES[args.method]}{REG_NAMES[args.reg]}: {len(dataset)} images, {len(text)} classes, "
              f"{common.count(total_steps, 'step')} of global batch {args.batch_size} on {dist.world} process(es), "
              f"{device}, amp {amp}")

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

            # --- TeCoA: PGD on the hard-label CE (Eq. 4-5); PMG-AFT and TGA-ZSR attack the same CE, add their terms
            def attack_loss(x):
                with ctx:
                    return tecoa_loss(common.cosine_sim(encoder(x), text), labels)

            encoder.eval()
            delta = common.random_start((args.batch_size, *images.shape[1:]), eps, args.seed, step, dist.rank,
                                        dist.world, device)
            x_adv = common.pgd(attack_loss, images, eps, alpha, args.attack_steps, delta)  # inner max, Eq. 5
            encoder.train()
            with ctx:
                if args.tga:  # three forwards keep every token (AGFT Table 10: 3 forward, 2 backward)
                    adv_tokens = train_encoder(x_adv, tokens=True)  # (b, 1+P, D), class token first
                    clean_tokens = train_encoder(images, tokens=True)  # (b, 1+P, D), not detached
                    with torch.no_grad():  # A_orig(x): the original model on the clean image
                        att_orig = text_guided_attention(orig_encoder(images, tokens=True), text, labels, resolution)
                    att_adv = text_guided_attention(adv_tokens, text, labels, resolution)  # (b, R·R)
                    att_clean = text_guided_attention(clean_tokens, text, labels, resolution)  # (b, R·R)
                    weight_adv, weight_clean, distance = TGA_FORMS[args.tga_form]
                    loss = tga_loss(common.cosine_sim(adv_tokens[:, 0], text), labels, att_adv, att_clean, att_orig,
                                    weight_adv, weight_clean, distance=distance)
                elif args.pmg:
                    adv_sim = common.cosine_sim(train_encoder(x_adv), text)  # (b, C)
                    with torch.no_grad():
                        orig_adv_sim = common.cosine_sim(orig_encoder(x_adv), text)  # (b, C) original model
                    clean_sim = common.cosine_sim(train_encoder(images), text)  # (b, C), not detached
                    loss = pmg_loss(adv_sim, orig_adv_sim, clean_sim, labels)
                elif args.reg != "none":  # TeCoA + AdvFLYP's L_logit and/or L_feat (the AdvFLYP paper's Table 9)
                    adv = train_encoder(x_adv)  # (b, D)
                    clean = train_encoder(images)  # (b, D), not detached
                    with torch.no_grad():
                        orig = orig_encoder(x_adv)  # (b, D) original model
                    loss = tecoa_loss(common.cosine_sim(adv, text), labels)
                    if args.reg in ("logit", "full"):
                        loss = loss + logit_reg(adv, orig, clean, text)  # P over the C class prompts
                    if args.reg in ("feat", "full"):
                        loss = loss + feature_reg(adv, orig, clean)
                else:
                    loss = tecoa_loss(common.cosine_sim(train_encoder(x_adv), text), labels)  # (b, C) similarities
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
