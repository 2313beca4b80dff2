"""Shared code for agft.py, tecoa.py, advflyp.py and evaluate.py.

The method scripts are meant to be read top to bottom; everything that is the same for all of them lives here behind
plain names: error handling, CLIP loading and the pixel-space wrapper, distributed + AMP setup, datasets (ImageNet,
ImageFolder, synthetic, the procedural demo), the PGD attack, the learning-rate schedule, the run directory
(args.json, log.jsonl, last.pt, model.pt) and zero-shot evaluation. Equations and choices follow ../shared/SPEC.md.
"""
import argparse
import copy
import json
import math
import os
import random
import re
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # the clip package imports it
import clip  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from clip.model import CLIP, build_model  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of the released models; all evaluation uses it (SPEC §1)


# ----------------------------------------------------------------------------------------------------------- errors
class UsageError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def run_main(main):
    """Run `main()`, turning UsageError into `error: ...` on stderr and exit status 2 (rank 0 alone prints)."""
    try:
        main()
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


# ------------------------------------------------------------------------------------------------------------ model
# Released architectures (the hyperparameters clip.model.CLIP takes), for `random:ARCH`: same shapes, random weights.
#   name: (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#          context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHITECTURES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
    # A tiny ViT (the demo's architecture): for tests and quick benchmarks on a CPU.
    "tiny": (64, 32, 3, 128, 8, 16, 49408, 64, 1, 2),
}


def clip_from_state_dict(state_dict):
    """Build a fp32 clip.model.CLIP from a state dict, keeping every weight exactly (clip's build_model alone
    rounds the weight matrices to fp16)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    model = build_model(dict(state_dict)).float()
    model.load_state_dict(state_dict)
    return model.eval()


def load_clip(spec, seed=0):
    """The CLIP model named by `spec` as a fp32 clip.model.CLIP on the CPU, in eval mode.

    spec: a released name (clip.load, downloads to ~/.cache/clip), a checkpoint file (a TorchScript archive like
    OpenAI's releases or this project's model.pt, or this project's last.pt / a plain state dict), `random:ARCH`
    (ARCH from ARCHITECTURES, random weights seeded by `seed`, no download) or `demo` (the demo's tiny CLIP).
    """
    if spec == "demo":
        return demo_clip()
    if spec.startswith("random:"):
        arch = spec[len("random:"):]
        if arch not in ARCHITECTURES:
            raise UsageError(f"--model {spec}: unknown architecture '{arch}' (one of {', '.join(ARCHITECTURES)})")
        torch.manual_seed(seed)
        return CLIP(*ARCHITECTURES[arch]).float().eval()
    if spec in clip.available_models():
        try:
            model, _ = clip.load(spec, device="cpu", jit=False)
        except Exception as e:  # network or disk problem while downloading
            raise UsageError(f"--model {spec}: could not load the released weights ({type(e).__name__}: {e})")
        return model.float().eval()
    if not os.path.exists(spec):
        raise UsageError(f"--model {spec}: no such file, and not a released name ({', '.join(clip.available_models())}),"
                         " random:ARCH or demo")
    if os.path.isdir(spec):
        raise UsageError(f"--model {spec}: is a directory, expected a checkpoint file")
    return clip_from_state_dict(read_checkpoint_weights(spec))


def read_checkpoint_weights(path):
    """The CLIP state dict in a TorchScript archive, a last.pt of this project or a plain state dict.
    Never unpickles arbitrary objects: TorchScript via torch.jit.load, everything else with weights_only=True."""
    state_dict = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--model {path}: unreadable checkpoint ({first_line[:200]})")
        state_dict = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or "visual.conv1.weight" not in state_dict or "text_projection" not in state_dict:
        raise UsageError(f"--model {path}: not a CLIP checkpoint (no CLIP weights found in it)")
    return dict(state_dict)


def save_torchscript(model, path):
    """Write `model` (a clip.model.CLIP) as a traced TorchScript archive, like OpenAI's releases, so that
    `clip.load(path, jit=False)` reads it without this project. Written atomically."""
    model = copy.deepcopy(model).float().cpu().eval()
    res = model.visual.input_resolution
    image = torch.rand(1, 3, res, res)
    text = clip.tokenize(["a photo"], context_length=model.context_length)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    tmp = path + ".tmp"
    traced.save(tmp)
    os.replace(tmp, path)


class ImageEncoder(nn.Module):
    """CLIP's image encoder f_θ on images in [0, 1] (SPEC §1): resizes (bicubic) to the model's resolution when
    needed and applies CLIP's mean/std inside, so attacks and ε-balls live in pixel space."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.resolution = visual.input_resolution
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):  # (B, 3, H, W) in [0, 1] -> (B, D) unnormalised features
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)  # clamp as PIL's bicubic does
        return self.visual((x - self.mean) / self.std)


@torch.no_grad()
def text_features(model, prompts, device, batch_size=500):
    """L2-normalised text embeddings g_φ(t) of `prompts`, (len(prompts), D) in fp32. Computed once per prompt set."""
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = clip.tokenize(prompts[i:i + batch_size], context_length=model.context_length, truncate=True)
        feats.append(model.encode_text(tokens.to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1)


def cosine_sim(image_features, text_feats):
    """s(x, t) = <f(x)/|f(x)|, g(t)/|g(t)|>: (B, D) raw image features, (C, D) normalised text -> (B, C), fp32."""
    return F.normalize(image_features.float(), dim=-1) @ text_feats.float().t()


def frozen_copy(module):
    """The original encoder f_θorig: a copy made before training that never gets gradients."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def prompts_for(class_names, template="This is a photo of a {}."):
    return [template.format(c) for c in class_names]


# ------------------------------------------------------------------------------------------- distributed and AMP
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, device)


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(t, dist):
    if dist.world > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def amp_setup(amp, device):
    """One autocast context for every forward pass and a GradScaler that is active only for fp16, so the training
    step has no dtype branches. amp: 'bf16' | 'fp16' | 'off' | 'auto' (bf16 on CUDA, off on CPU)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device (use bf16 or off on the CPU)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    ctx = nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
    return amp, ctx, scaler


# ------------------------------------------------------------------------------------------------------------- data
def image_transform(resolution):
    """Resize (bicubic) + CenterCrop to the model's resolution, to a tensor in [0, 1] (no normalisation here)."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.ToTensor(),
    ])


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic random images with random labels, for benchmarks and tests: item i depends only on (seed, i)."""

    def __init__(self, n, num_classes, resolution, seed=0):
        self.n, self.num_classes, self.resolution, self.seed = n, num_classes, resolution, seed
        self.classes = [f"class {i}" for i in range(num_classes)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        image = torch.rand(3, self.resolution, self.resolution, generator=g)
        return image, int(torch.randint(self.num_classes, (), generator=g))


def read_class_names(path, n_classes):
    if not os.path.isfile(path):
        raise UsageError(f"--class-names {path}: no such file")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != n_classes:
        raise UsageError(f"--class-names {path}: has {len(names)} names, the dataset has {n_classes} classes")
    return names


def refine_class_name(name):
    """Folder name -> prompt-ready class name: '_' and '-' become spaces, lower case (SPEC §6)."""
    return re.sub(r"[_\-]+", " ", name).strip().lower()


def training_dataset(spec, resolution, class_names_file=None, synthetic_size=None, seed=0):
    """(dataset of (image in [0, 1], label), class names) for `--data`.

    spec: `synthetic`; `demo`; an ImageNet root with the devkit (ILSVRC2012_devkit_t12.tar.gz or meta.bin) and
    train/ (read through torchvision, class names = first synonym); a folder with train/; or an ImageFolder
    directory (class names from the folder names, or one per line in --class-names, in sorted folder order).
    """
    if spec == "synthetic":
        ds = SyntheticImages(synthetic_size or 10_000, 1000, resolution, seed)
        return ds, ds.classes
    if spec == "demo":
        ds = DemoImages(DEMO_PROXY, 64, resolution, seed=1)
        return ds, ds.classes
    if not os.path.isdir(spec):
        raise UsageError(f"--data {spec}: no such directory (expected an ImageNet root with train/ and the devkit, "
                         "an ImageFolder directory, 'synthetic' or 'demo')")
    from torchvision import datasets
    transform = image_transform(resolution)
    has_devkit = any(os.path.exists(os.path.join(spec, f)) for f in ("meta.bin", "ILSVRC2012_devkit_t12.tar.gz"))
    if has_devkit and os.path.isdir(os.path.join(spec, "train")):
        ds = datasets.ImageNet(spec, split="train", transform=transform)
        names = [c[0] for c in ds.classes]
    else:
        root = os.path.join(spec, "train") if os.path.isdir(os.path.join(spec, "train")) else spec
        try:
            ds = datasets.ImageFolder(root, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"--data {spec}: not an ImageFolder directory ({e})")
        names = [refine_class_name(c) for c in ds.classes]
        if class_names_file is None and all(re.fullmatch(r"n\d{8}", c) for c in ds.classes):
            raise UsageError(f"--data {spec}: class folders are WordNet ids; put ILSVRC2012_devkit_t12.tar.gz in "
                             f"{spec} or give --class-names FILE (one name per line, in sorted folder order)")
    if class_names_file is not None:
        names = read_class_names(class_names_file, len(names))
    return ds, names


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each global batch, in a permutation that depends only on (seed, epoch).

    The sequence of global batches is therefore the same for any number of processes, so a run with W processes
    follows the trajectory of one process with the same global batch. `set_epoch(epoch, start)` skips the first
    `start` batches of the epoch (resume). The last incomplete global batch is dropped."""

    def __init__(self, n, global_batch, rank, world, seed):
        if global_batch % world:
            raise UsageError(f"--batch-size {global_batch} is not divisible by the number of processes ({world})")
        if n < global_batch:
            raise UsageError(f"the dataset has {n} samples, fewer than one global batch ({global_batch})")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self):
        return self.n // self.global_batch

    def __len__(self):
        return self.batches_per_epoch() - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 10_007 + self.epoch))
        for b in range(self.start, self.batches_per_epoch()):
            batch = perm[b * self.global_batch:(b + 1) * self.global_batch]
            yield batch[self.rank * self.local_batch:(self.rank + 1) * self.local_batch].tolist()


def make_loader(dataset, batch_sampler, workers, device):
    """DataLoader with workers, pinned memory and persistent workers on CUDA."""
    cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=cuda,
                                       persistent_workers=cuda and workers > 0)


# ------------------------------------------------------------------------------------------------------- the demo
# A task that needs no download: coloured shapes on textured backgrounds, 32x32 pixels. A concept is a colour and a
# shape ("a red ring"). A tiny CLIP is pretrained contrastively on captions of all 64 concepts; fine-tuning sees the
# 32 "proxy" concepts, and zero-shot evaluation uses the other 32, held out, with their own class prompts.
DEMO_COLOURS = {
    "red": (0.90, 0.12, 0.12), "green": (0.12, 0.75, 0.20), "blue": (0.15, 0.30, 0.95), "yellow": (0.95, 0.88, 0.12),
    "purple": (0.60, 0.20, 0.80), "cyan": (0.12, 0.82, 0.88), "orange": (1.00, 0.55, 0.05), "white": (0.94, 0.94, 0.94),
}
DEMO_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "bar", "frame")
DEMO_CONCEPTS = [(c, s) for c in DEMO_COLOURS for s in DEMO_SHAPES]
_held_out = lambda i: (i // 8 + 2 * (i % 8)) % 4 == 0  # noqa: E731  (16 concepts, every colour and shape twice)
DEMO_PROXY = [cs for i, cs in enumerate(DEMO_CONCEPTS) if not _held_out(i)]  # 48 concepts seen by fine-tuning
DEMO_HELD_OUT = [cs for i, cs in enumerate(DEMO_CONCEPTS) if _held_out(i)]  # 16 concepts, zero-shot only
DEMO_CAPTIONS = ("a {c} {s}.", "a photo of a {c} {s}.", "a {s} that is {c}.", "a drawing of a {c} {s}.",
                 "a {c} {s} on a dark background.", "a small {c} {s}.")


def demo_image(colour, shape, g, resolution=32):
    """One image of `colour` `shape`, all randomness from generator `g`: (3, R, R) in [0, 1]."""
    R = resolution
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    r = u(0.22, 0.34) * R
    cy, cx = u(r, R - r), u(r, R - r)
    yy, xx = torch.meshgrid(torch.arange(R) + 0.5, torch.arange(R) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx
    d, m = (dx ** 2 + dy ** 2).sqrt(), torch.maximum(dx.abs(), dy.abs())
    mask = {
        "circle": d <= r,
        "square": m <= 0.85 * r,
        "triangle": (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= 0.6 * (dy + r)),
        "diamond": dx.abs() + dy.abs() <= r,
        "ring": (d <= r) & (d >= 0.55 * r),
        "cross": ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
        "bar": (dy.abs() <= r / 3.5) & (dx.abs() <= r),
        "frame": (m <= 0.85 * r) & (m >= 0.5 * r),
    }[shape].float()
    background = u(0.05, 0.35) + 0.08 * torch.randn(3, R, R, generator=g)  # grey level and texture
    colour = torch.tensor(DEMO_COLOURS[colour]) + 0.06 * torch.randn(3, generator=g)
    image = background * (1 - mask) + colour.view(3, 1, 1) * mask + 0.03 * torch.randn(3, R, R, generator=g)
    return image.clamp(0, 1)


class DemoImages(torch.utils.data.Dataset):
    """`per_concept` images of each concept in `concepts`, labelled by concept index; item i depends only on
    (seed, i). `captions=True` yields (image, caption) pairs instead, for contrastive pretraining."""

    def __init__(self, concepts, per_concept, resolution=32, seed=0, captions=False):
        self.concepts, self.per_concept, self.resolution, self.seed = concepts, per_concept, resolution, seed
        self.captions = captions
        self.classes = [f"{c} {s}" for c, s in concepts]

    def __len__(self):
        return len(self.concepts) * self.per_concept

    def __getitem__(self, i):
        label = i % len(self.concepts)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        colour, shape = self.concepts[label]
        image = demo_image(colour, shape, g, 32)
        if self.resolution != 32:
            image = F.interpolate(image[None], size=self.resolution, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        if self.captions:
            template = DEMO_CAPTIONS[int(torch.randint(len(DEMO_CAPTIONS), (), generator=g))]
            return image, template.format(c=colour, s=shape)
        return image, label


def demo_cache_path():
    root = os.environ.get("CLIP_AFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clip-aft")
    return os.path.join(root, "demo-clip-v1.pt")


def demo_clip(steps=1500, log=print):
    """The demo's tiny CLIP (ARCHITECTURES['tiny']), pretrained contrastively on captioned demo images of all 64
    concepts. Deterministic; cached in $CLIP_AFT_CACHE (default ~/.cache/clip-aft) after the first call."""
    path = demo_cache_path()
    if os.path.isfile(path):
        return clip_from_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    log(f"pretraining the demo CLIP ({steps} steps, cached in {path}) ...")
    torch.manual_seed(0)
    model = CLIP(*ARCHITECTURES["tiny"]).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    data = DemoImages(DEMO_CONCEPTS, 10_000, seed=0, captions=True)
    batch = len(DEMO_CONCEPTS)  # one image of each concept per batch: no duplicate captions, no false negatives
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, 2e-3, 100, steps)
        items = [data[step * batch + j] for j in range(batch)]
        images = torch.stack([im for im, _ in items])
        tokens = clip.tokenize([c for _, c in items], context_length=model.context_length)
        image_f = F.normalize(ImageEncoder(model.visual)(images), dim=-1)
        text_f = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=CLIP_LOGIT_SCALE) * image_f @ text_f.t()
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2  # CLIP's InfoNCE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"  step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    model.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"model": model.state_dict(), "steps": steps}, path)
    return model


# ------------------------------------------------------------------------------------------------------------- PGD
def random_start(global_shape, eps, seed, step, rank, world, device):
    """PGD's uniform random start U(-ε, ε) for this rank's share of a global batch. Drawn for the whole global
    batch from a generator seeded by (seed, step), so it does not depend on the number of processes."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    delta = (torch.rand(global_shape, generator=g, device=device) * 2 - 1) * eps
    local = global_shape[0] // world
    return delta[rank * local:(rank + 1) * local]


def pgd(loss_fn, x, eps, alpha, steps, delta=None):
    """ℓ∞ PGD (SPEC §2): maximise loss_fn(x_adv) (a scalar) over the ε-ball around x, inside [0, 1].

    x_0 = clamp(x + δ, 0, 1) with δ ~ U(-ε, ε) unless `delta` is given;
    x_{s+1} = clamp(x + clamp(x_s + α·sign(∇ loss(x_s)) − x, −ε, ε), 0, 1); the last iterate is returned.
    Only the input gradient is computed (torch.autograd.grad), so parameters never accumulate .grad; callers put
    the model in eval mode."""
    x = x.detach()
    if delta is None:
        delta = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


# ------------------------------------------------------------------------------------------------- training harness
def cosine_lr(step, base_lr, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_parser(doc, method, **defaults):
    """The flags every training script shares; `defaults` are the method's paper settings."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B/32", help="released CLIP name, checkpoint file, random:ARCH or demo")
    p.add_argument("--data", default="./data/imagenet",
                   help="ImageNet root (train/ + devkit), ImageFolder directory, 'synthetic' or 'demo'")
    p.add_argument("--class-names", default=None, help="file with one class name per line (sorted folder order)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<timestamp>); reused = resume")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split across processes")
    p.add_argument("--lr", type=float, default=defaults.pop("lr"), help="peak learning rate (SGD)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps before cosine decay")
    p.add_argument("--eps", type=float, default=1.0, help="training ε, in units of 1/255 (ℓ∞)")
    p.add_argument("--alpha", type=float, default=None, help="PGD step size in units of 1/255 (default: = eps)")
    p.add_argument("--attack-steps", type=int, default=2, help="PGD steps of the inner maximisation")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, PGD random starts, random weights")
    p.add_argument("--save-every", type=int, default=500, help="write last.pt every this many steps (and each epoch)")
    p.add_argument("--log-every", type=int, default=10, help="log every this many steps")
    p.add_argument("--synthetic-size", type=int, default=10_000, help="number of images of --data synthetic")
    p.add_argument("--demo", action="store_true",
                   help="the built-in demo: tiny CLIP, procedural data, before/after zero-shot table (no download)")
    p.set_defaults(method=method, **defaults)
    return p


# Demo settings shared by the methods (a method adds its own lr): tiny model, 32x32 images, minutes on a CPU.
DEMO_DEFAULTS = dict(model="demo", data="demo", epochs=3, batch_size=64, warmup=20, eps=4.0, workers=0,
                     save_every=1000, log_every=10, weight_decay=0.0)


def parse_train_args(parser, argv=None, demo_defaults=None):
    """Parse, apply --demo defaults (flags given explicitly still win), derive values, validate."""
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**{**DEMO_DEFAULTS, **(demo_defaults or {})})
        args = parser.parse_args(argv)
    if args.alpha is None:
        args.alpha = args.eps
    for name in ("eps", "alpha"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be >= 0")
    for name in ("epochs", "batch_size", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps}: must be >= 1")
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if args.data not in ("synthetic", "demo") and not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: no such directory (an ImageNet root with train/ and the devkit, "
                         "an ImageFolder directory, 'synthetic' or 'demo')")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    return args


def atomic_save(obj, path):
    """torch.save to path.tmp, fsync, rename: a crash never leaves a half-written file under `path`."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Run:
    """The run directory: args.json, log.jsonl, last.pt (resume), model.pt (TorchScript), results.json.
    Only rank 0 writes; every rank reads last.pt when resuming."""

    def __init__(self, args, dist):
        self.dir, self.dist = args.out, dist
        self.ckpt_path = os.path.join(self.dir, "last.pt")
        if dist.is_main:
            os.makedirs(self.dir, exist_ok=True)
            if not os.path.exists(self.ckpt_path):
                write_json(vars(args), os.path.join(self.dir, "args.json"))
        self.t_last, self.steps_since = time.time(), 0

    def print(self, *a):
        if self.dist.is_main:
            print(*a, flush=True)

    def log(self, record):
        """Append one JSON object to log.jsonl and print it (rank 0)."""
        if self.dist.is_main:
            with open(os.path.join(self.dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def throughput(self, step, global_batch, device):
        """images/s and s/step since the last call, and peak memory (MiB) of this process."""
        now = time.time()
        dt, n = now - self.t_last, max(1, step - self.steps_since)
        self.t_last, self.steps_since = now, step
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return {"img_per_s": round(n * global_batch / dt, 2), "s_per_step": round(dt / n, 4), "peak_mem_mib": round(peak)}

    def load(self):
        """The last.pt checkpoint (weights_only) or None."""
        if not os.path.exists(self.ckpt_path):
            return None
        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{self.ckpt_path}: unreadable checkpoint ({type(e).__name__}); move it away to restart")

    def save(self, state):
        if self.dist.is_main:
            atomic_save(state, self.ckpt_path)

    def write_model(self, clip_model):
        if self.dist.is_main:
            save_torchscript(clip_model, os.path.join(self.dir, "model.pt"))

    def write_results(self, results):
        if self.dist.is_main:
            write_json(results, os.path.join(self.dir, "results.json"))


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(clip_model, optimizer, scaler, step, total_steps, args):
    """Everything needed to resume exactly; only tensors, numbers, strings, lists and dicts (weights_only)."""
    return {"model": clip_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "scheduler": {"kind": "cosine", "warmup": args.warmup, "total": total_steps, "base_lr": args.lr},
            "step": step, "rng": rng_state(), "args": vars(args)}


def progress(iterable, dist, **kw):
    """tqdm on rank 0 (when attached to a terminal), the bare iterable elsewhere."""
    if not dist.is_main or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------------------ evaluation
class Indexed(torch.utils.data.Dataset):
    """Wraps a dataset to also return each item's index (for per-sample random starts)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


def eval_loader(dataset, batch_size, dist, workers=0):
    """This rank's shard of `dataset`: indices rank, rank + W, ... (every sample exactly once, no padding)."""
    shard = torch.utils.data.Subset(Indexed(dataset), list(range(dist.rank, len(dataset), dist.world)))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=dist.device.type == "cuda")


def per_sample_start(index, shape, eps, seed, device):
    """U(-ε, ε) noise for each sample from a generator seeded by its dataset index: independent of batching and
    of the number of processes. index: (B,) -> (B, *shape)."""
    out = torch.empty((len(index), *shape), device=device)
    for j, i in enumerate(index.tolist()):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        out[j] = (torch.rand(shape, generator=g, device=device) * 2 - 1) * eps
    return out


def ce_attack_loss(logits_fn, y):
    """Sum over the batch of CE(logits, y): PGD's evaluation loss (SPEC §2). Summing keeps each sample's gradient
    independent of the batch size."""
    return lambda x_adv: F.cross_entropy(logits_fn(x_adv), y, reduction="sum")


def attack_pgd(logits_fn, x, y, index, eps, alpha, steps, seed):
    """Untargeted PGD on CE at CLIP's logit scale (SPEC §6 `pgd`)."""
    delta = per_sample_start(index, x.shape[1:], eps, seed, x.device)
    return pgd(ce_attack_loss(logits_fn, y), x, eps, alpha, steps, delta)


ATTACKS = {"pgd": attack_pgd}  # name -> fn(logits_fn, x, y, index, eps, alpha, steps, seed) -> x_adv
DEFAULT_ATTACK_STEPS = {"pgd": 20}


def zero_shot_eval(encoder, text_feats, dataset, dist, attacks=("pgd",), eps=1 / 255, alpha=1 / 255, steps=None,
                   batch_size=256, ctx=nullcontext(), seed=0, workers=0, desc=None):
    """Zero-shot clean and robust accuracy (%) of `encoder` on `dataset` with class text features `text_feats`.

    Logits are CLIP_LOGIT_SCALE · s(f(x), T). Each attack's robust accuracy counts pred(x_adv) == y. Counts are
    summed across processes; every sample is counted once. Returns {"n": int, "clean": %, attack: %, ...}."""
    encoder.eval()
    logits_fn = lambda x: CLIP_LOGIT_SCALE * cosine_sim(encoder(x), text_feats)  # noqa: E731
    correct = torch.zeros(1 + len(attacks), dtype=torch.float64, device=dist.device)
    n = torch.zeros(1, dtype=torch.float64, device=dist.device)
    for x, y, index in progress(eval_loader(dataset, batch_size, dist, workers), dist, desc=desc, leave=False):
        x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
        with ctx, torch.no_grad():
            correct[0] += (logits_fn(x).argmax(-1) == y).sum()
        for k, name in enumerate(attacks, start=1):
            with ctx:
                x_adv = ATTACKS[name](logits_fn, x, y, index, eps, alpha, steps or DEFAULT_ATTACK_STEPS[name], seed)
            with ctx, torch.no_grad():
                correct[k] += (logits_fn(x_adv).argmax(-1) == y).sum()
        n += len(y)
    all_reduce_sum(correct, dist)
    all_reduce_sum(n, dist)
    n = int(n.item())
    acc = (100.0 * correct / max(n, 1)).tolist()
    return {"n": n, **{name: round(a, 2) for name, a in zip(("clean",) + tuple(attacks), acc)}}


def demo_evaluate(encoder, clip_model, dist, ctx, args, run, when):
    """Zero-shot clean and PGD-20 (α = 1/255, ε = --eps) accuracy on the demo's held-out and proxy concepts."""
    out = {}
    for name, concepts in (("held_out", DEMO_HELD_OUT), ("proxy", DEMO_PROXY)):
        ds = DemoImages(concepts, 512 // len(concepts), clip_model.visual.input_resolution, seed=2)  # test images, unseen in training
        text = text_features(clip_model, prompts_for(ds.classes), dist.device)
        out[name] = zero_shot_eval(encoder, text, ds, dist, ("pgd",), args.eps / 255, 1 / 255, 20, ctx=ctx,
                                   seed=args.seed, desc=f"{when}: {name}")
    run.print(f"{when}: held-out {out['held_out']}  proxy {out['proxy']}")
    return out


def demo_report(run, args, before, after):
    """Print the demo's before/after table and write results.json."""
    rows = [("before (original CLIP)", before), (f"after ({args.method.upper()})", after)]
    run.print(f"\nZero-shot accuracy (%), ε = {args.eps:g}/255, PGD-20:")
    run.print(f"{'':24s} {'held-out clean':>15s} {'held-out PGD':>13s} {'proxy clean':>12s} {'proxy PGD':>10s}")
    for label, r in rows:
        run.print(f"{label:24s} {r['held_out']['clean']:15.2f} {r['held_out']['pgd']:13.2f} "
                  f"{r['proxy']['clean']:12.2f} {r['proxy']['pgd']:10.2f}")
    run.write_results({
        "before": before["held_out"], "after": after["held_out"],
        "proxy": {"before": before["proxy"], "after": after["proxy"]},
        "eps": args.eps, "method": args.method,
        "held_out_concepts": [f"{c} {s}" for c, s in DEMO_HELD_OUT],
        "proxy_concepts": [f"{c} {s}" for c, s in DEMO_PROXY],
    })
