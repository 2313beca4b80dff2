"""Shared code for agft.py, tecoa.py, advflyp.py, fare.py and evaluate.py: everything that is the same for every
method, behind plain names, so that the method scripts read top to bottom. The equations, defaults and choices are
in docs/ (docs/methods.md for the methods, docs/attacks.md for the attacks, which live in attacks.py).
What has one reader lives with it: the evaluation attacks in attacks.py, the benchmark's datasets in
eval_datasets.py, the test-time defences in defenses.py. What is here has several readers among the training
scripts, or is what their validation (zero_shot_accuracy: clean and PGD accuracy with per-image random starts) and
their failure paths (signals, loaders, writes) need; the method scripts import this file alone.

Sections, in the order data flows (search for the `# ---- name` rule):
    errors               exit statuses, UsageError (one-line errors, exit 2), Preempted, Stop, failure_message,
                         run_main (signals, every way out, no process left); METHOD_NAMES and count, for messages
    model                load_clip (names, checkpoints, random:ARCH, demo), released image-encoder weights
                         (--vision-weights: VISION_LAYOUTS, vision_state_dict, load_vision_weights), vit_forward
                         (CLIP's ViT forward, with per-token embeddings on request), ImageEncoder (pixel space,
                         [0, 1]), input_grad (every attack's one differentiation, with the fp16 guard that
                         ImageEncoder applies), text_features, cosine_sim, frozen_copy, save_torchscript
    distributed and AMP  setup_distributed (torchrun, NCCL/gloo, a host-side gloo group), all_reduce_sum, first_error,
                         all_gather_with_grad, Preemption (SIGTERM/SIGUSR1/SIGINT: deferred and interruptible
                         scopes; SIGNALS), worker_ignores_signals, amp_setup
    data                 training_dataset (ImageNet, ImageFolder, synthetic), take_subset (--subset),
                         GlobalBatchSampler, Loader and stop_loaders (no worker outlives its run), make_loader;
                         caption data (AdvFLYP: CSV/TSV, JSON records, the AdvFLYP LAION release, img2dataset);
                         images alone (FARE: image_dataset);
                         labelled evaluation images (class folders, WordNet ids, TinyImageNet: what AdvFLYP's
                         validation_dataset and eval_datasets.py share), eval_loader
    PGD                  random_start, pgd (training's inner maximisation), attack_pgd (per-image random starts),
                         zero_shot_accuracy (clean and PGD accuracy: the demo's tables, AdvFLYP's validation)
    training harness     cosine_lr, schedule_steps, train_parser / parse_train_args, Run (the run directory:
                         args.json, log.jsonl, last.pt, model.pt, model_state_dict.pt; resume, preemption, unreadable
                         images, non-finite losses), writing / atomic_write (a full or read-only --out: one line),
                         checkpoint_state
    demo                 the procedural task (DemoImages), its tiny pretrained CLIP (demo_clip), demo tables and
                         the picture (draw_demo_figure: figures.py in a process of its own)
"""
import argparse
import atexit
import collections
import contextlib
import contextvars
import copy
import errno
import hashlib
import json
import math
import multiprocessing.util  # before atexit.register below: its exit handler must run after ours
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # the clip package imports it
import clip  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from clip.model import CLIP, VisionTransformer, build_model  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of the released models; all evaluation uses it (docs/methods.md)


# ------------------------------------------------------------------------------------------------------------- errors
# Exit statuses (docs/cluster.md): 0 done; 1 a failure of the machine or of another process (a DataLoader worker
# killed, a process of the job gone), rerun to resume; 2 a one-line error (bad input, an unwritable --out, a
# non-finite loss), rerunning alone does not help; 75 stopped by SIGTERM/SIGUSR1 (a preemption notice) with the state
# saved (EX_TEMPFAIL: rerun the same command); 130 stopped by SIGINT (Ctrl-C) with the state saved.
FAILED, PREEMPTED, INTERRUPTED = 1, 75, 130


class UsageError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


class Preempted(Exception):
    """Raised once the state is saved after a signal (see Preemption): exit status `status` (PREEMPTED, or
    INTERRUPTED after SIGINT)."""

    def __init__(self, message, status=PREEMPTED):
        super().__init__(message)
        self.status = status


class Stop(BaseException):
    """Raised by the signal handler itself inside an interruptible scope (Preemption.interruptible): work whose
    partial result is thrown away (an evaluation batch, setup). A BaseException, so that no `except Exception` on the
    way swallows it; run_main prints its message and exits with its status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def failure_message(e):
    """One line for the failures of the processes a run is made of (exit status FAILED), else None (a bug in the
    main process: its traceback): an error raised in a DataLoader worker (its last line and where), a worker that
    died (the out-of-memory killer's SIGKILL, say), another process of the job that ended (gloo/NCCL report the
    closed connection)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if first.startswith("Caught ") and "in DataLoader worker process" in first:  # re-raised from a worker
        frames = re.findall(r'File "([^"]+)", line (\d+)', text)
        where = f", at {os.path.basename(frames[-1][0])}:{frames[-1][1]}" if frames else ""
        return (f"{text.splitlines()[-1].strip()} (in a DataLoader worker{where}); the saved state is kept")
    if isinstance(e, RuntimeError) and first.startswith("DataLoader worker (pid"):
        return (f"{first.rstrip('. ')}: a data-loading process ended (killed by the out-of-memory killer? try fewer "
                "--workers); the saved state is kept, rerun the same command to resume")
    if isinstance(e, RuntimeError) and (isinstance(e, getattr(torch_dist, "DistError", ())) or any(
            k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))):
        return (f"another process of this job ended ({first.split('] ')[-1][:160]}); its own error is printed "
                "above or in its log; the saved state is kept, rerun the same command to resume")
    return None


def run_main(main):
    """Run `main()` as a script: the process's signal handlers (Preemption) installed for the whole run, and every
    way out turned into its exit status (see FAILED, PREEMPTED, INTERRUPTED) with one line, never a hang: UsageError
    -> `error: ...` on stderr, 2; Preempted and Stop -> their message on stdout, their status; a dead DataLoader
    worker or a lost peer process -> one line, FAILED; Ctrl-C twice -> 130. Whatever happens, the DataLoader workers
    are stopped before the process exits (stop_loaders) and the signal handlers restored. Rank 0 prints what every
    rank knows; a rank prints what only it knows (a lost worker or peer) with its rank."""
    rank = int(os.environ.get("RANK", "0"))
    status, message, stream = 0, None, sys.stdout
    SIGNALS.start()
    try:
        with SIGNALS.interruptible("during setup, with nothing new to save"):  # nothing half-done to keep
            main()
            SIGNALS.check("after finishing its work (everything is saved)")  # a signal no step boundary saw
    except UsageError as e:
        status, message, stream = 2, f"error: {e}" if rank == 0 else None, sys.stderr
    except (Preempted, Stop) as e:
        status, message = e.status, str(e) if rank == 0 else None
    except KeyboardInterrupt:
        status, message, stream = INTERRUPTED, "interrupted (a second Ctrl-C): stopped at once", sys.stderr
    except Exception as e:
        failure = failure_message(e)
        if failure is None:
            raise  # a bug: its traceback, printed after the finally below has stopped the workers
        status, message, stream = FAILED, f"error (rank {rank}): {failure}", sys.stderr
    finally:
        stop_loaders()
        SIGNALS.end()
    if message:
        print(message, file=stream, flush=True)
    if status in (PREEMPTED, INTERRUPTED):
        cleanup_distributed()
    if status:
        sys.exit(status)


METHOD_NAMES = {"agft": "AGFT", "tecoa": "TeCoA", "pmg-aft": "PMG-AFT", "tga-zsr": "TGA-ZSR", "advflyp": "AdvFLYP",
                "fare": "FARE"}  # --method (run names, args.json) -> the papers' spelling, for what a run prints


def count(n, noun):
    """'1 step', '2 steps': a number and its noun in the number's grammatical number (nouns taking -s)."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


# -------------------------------------------------------------------------------------------------------------- model
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
    # A tiny ViT (the demo's architecture) and a tiny ResNet (BatchNorm): for tests and quick benchmarks on a CPU.
    "tiny": (64, 32, 3, 128, 8, 16, 49408, 64, 1, 2),
    "tiny-rn": (64, 32, (1, 1, 1, 1), 8, None, 16, 49408, 64, 1, 2),
}


def clip_from_state_dict(state_dict):
    """Build a fp32 clip.model.CLIP from a state dict, keeping every weight exactly (clip's build_model alone
    rounds the weight matrices to fp16)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    model = build_model(dict(state_dict)).float()
    model.load_state_dict(state_dict)
    return model.eval()


def load_clip(spec, seed=0, vision_weights=None, dist=None):
    """The CLIP model named by `spec` as a fp32 clip.model.CLIP on the CPU, in eval mode.

    spec: a released name (downloaded by clip's downloader to ~/.cache/clip), a checkpoint file (a TorchScript
    archive like OpenAI's releases or this project's model.pt, or this project's last.pt / a plain state dict),
    `random:ARCH` (ARCH from ARCHITECTURES, random weights seeded by `seed`, no download) or `demo` (the demo's tiny
    CLIP). Under torchrun pass `dist`: a download or the demo CLIP's pretraining then happens once (prepare_files).
    vision_weights: a file of image-encoder weights (--vision-weights: any layout of VISION_LAYOUTS, e.g. a robust
    model another project released), loaded strictly into the image encoder; the text encoder and the logit scale
    stay those of `spec`.
    """
    model = clip_from_spec(spec, seed, dist)
    if vision_weights is not None:
        layout = load_vision_weights(model.visual, vision_weights)
        if dist is None or dist.is_main:
            print(f"--vision-weights {vision_weights}: {layout}, loaded into the image encoder of {spec}", flush=True)
    return model


def clip_from_spec(spec, seed=0, dist=None):
    """load_clip without --vision-weights."""
    if spec == "demo":
        return prepare_files(dist, lambda may_write: demo_clip())  # pretrained once, cached
    if spec.startswith("random:"):
        arch = spec[len("random:"):]
        if arch not in ARCHITECTURES:
            raise UsageError(f"--model {spec}: unknown architecture '{arch}' (one of {', '.join(ARCHITECTURES)})")
        torch.manual_seed(seed)
        return CLIP(*ARCHITECTURES[arch]).float().eval()
    if spec in clip.available_models():
        path = prepare_files(dist, lambda may_write: released_weights_file(spec, verify=may_write))
        model, _ = clip.load(path, device="cpu", jit=False)
        return model.float().eval()
    check_file(spec, "--model", f"no such file, and not a released name ({', '.join(clip.available_models())}), "
                                "random:ARCH or demo")
    return clip_from_state_dict(read_checkpoint_weights(spec))


def released_weights_file(name, root=None, verify=True):
    """Path of OpenAI's released weights `name` in clip's cache (~/.cache/clip), downloaded first when missing or
    corrupt: by clip's own downloader (which checks the SHA-256 named in the release URL) into a temporary folder
    beside the cache, then renamed into place, so that no process ever reads or truncates a partial file.
    verify=False trusts a file that is there (prepare_files' readers, after a writer has checked it)."""
    import shutil
    import tempfile
    url = clip.clip._MODELS[name]
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "clip")
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target) and not verify:
        return target
    if os.path.isfile(target) and file_sha256(target) == url.split("/")[-2]:  # OpenAI's URL holds the checksum
        return target
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
        try:
            os.replace(clip.clip._download(url, tmp), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # network or disk problem, or a bad checksum
        raise UsageError(f"--model {name}: could not download the released weights to {root} "
                         f"({type(e).__name__}: {e})")
    return target


def file_sha256(path):
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path, flag, missing="no such file"):
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: {missing}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, expected a checkpoint file")


def read_checkpoint(path, flag="--model"):
    """What `path` holds: a TorchScript archive's state dict (torch.jit.load), else the object torch.load reads with
    weights_only=True, where besides tensors and containers only numpy scalars and dtypes may be unpickled (scripts
    of other projects save e.g. a best accuracy as a numpy float). Never runs code from the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    except Exception:
        pass
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 moved numpy.core
    numpy_globals = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                     *{type(np.dtype(c)) for c in "?bhilqBHILQefdFD"}]  # numeric dtypes' classes (numpy >= 1.25)
    try:
        with torch.serialization.safe_globals(numpy_globals):  # for this load only
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{flag} {path}: unreadable checkpoint: {checkpoint_problem(path, e)}")


def checkpoint_problem(path, error):
    """What is wrong with a file that torch.load(weights_only=True) refused, in words (not PyTorch's advice to load it
    with weights_only=False, which would run code from the file)."""
    with open(path, "rb") as f:
        head = f.read(4)
    pickled = head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")  # PyTorch's zip format, or a bare pickle
    if pickled and "Weights only load failed" in str(error):
        return ("it holds Python objects besides tensors, numbers, strings, lists and dicts; loading them would run "
                "code from the file, which this project never does")
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch archive that is truncated or corrupt (an interrupted download or copy?)"
    return "not a PyTorch checkpoint, state dict or TorchScript archive"


def read_checkpoint_weights(path):
    """The CLIP state dict in a TorchScript archive, a last.pt of this project or a plain state dict.
    Never unpickles arbitrary objects: TorchScript via torch.jit.load, everything else with weights_only=True."""
    obj = read_checkpoint(path, "--model")
    state_dict = obj.get("model", obj) if isinstance(obj, dict) else None
    if (not isinstance(state_dict, dict) or "visual.conv1.weight" not in state_dict
            or "text_projection" not in state_dict):
        raise UsageError(f"--model {path}: not a CLIP checkpoint (no CLIP weights found in it)")
    return dict(state_dict)


# Where each project keeps the image encoder in the checkpoint it publishes (--vision-weights; the line of each
# project that saves it is in docs/released-weights.md). A layout: (name, the keys that lead from the loaded object to a
# state dict, the prefix of the image encoder's keys in that state dict, whether the state dict is a whole CLIP,
# i.e. may also hold the text encoder and the logit scale, which --vision-weights leaves to --model). Tried in order:
# the first layout whose keys lead to a dict of tensors with image-encoder keys under its prefix decides.
VISION_LAYOUTS = (
    ("TeCoA / PMG-AFT / TGA-ZSR checkpoint (vision_encoder_state_dict)", ("vision_encoder_state_dict",), "", False),
    ("AGFT checkpoint (modules/clip.visual)", ("modules", "clip.visual"), "", False),
    ("AdvFLYP checkpoint (partial_state_dict)", ("partial_state_dict",), "visual.", False),
    ("checkpoint with a whole CLIP under 'model' (this project's last.pt)", ("model",), "visual.", True),
    ("open_clip training checkpoint (state_dict)", ("state_dict",), "visual.", True),
    ("whole CLIP (OpenAI, open_clip, this project's model.pt or model_state_dict.pt)", (), "visual.", True),
    ("image-encoder state dict (RobustVLM FARE / TeCoA, open_clip model.visual)", (), "", False),
)


def vision_state_dict(obj):
    """Which layout of VISION_LAYOUTS a loaded checkpoint `obj` has: (layout name, the image encoder's state dict
    under its own key names (model.visual's), the keys found outside the image encoder in a layout that should
    have none), or None when no layout fits. DataParallel's `module.` prefixes are removed. Pure: reads no file."""
    for name, path, prefix, whole_clip in VISION_LAYOUTS:
        node = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not node or not all(isinstance(v, torch.Tensor) for v in node.values()):
            continue
        weights = {re.sub(r"^(module\.)+", "", k): v for k, v in node.items()}
        if not prefix and any(k.startswith("visual.") for k in weights):
            continue  # a whole CLIP, not an image encoder alone
        encoder = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if encoder:
            return name, encoder, [] if whole_clip else sorted(k for k in weights if not k.startswith(prefix))
    return None


def open_clip_config_check(path):
    """open_clip's Hugging Face layout keeps the architecture in open_clip_config.json beside the weights file
    (open_clip_pytorch_model.bin). Refuse weights trained with nn.GELU: clip.model.CLIP computes QuickGELU."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        quick_gelu = config.get("model_cfg", config).get("quick_gelu", False)
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"--vision-weights {path}: unreadable {config_path} ({type(e).__name__}: {e})")
    if quick_gelu is not True:
        raise UsageError(f"--vision-weights {path}: {config_path} describes a model with GELU activations (no "
                         "\"quick_gelu\": true); clip.model.CLIP computes QuickGELU, so its features would be wrong")


def load_vision_weights(visual, path):
    """Load the image-encoder weights in `path` (any layout of VISION_LAYOUTS) into `visual` (a CLIP's .visual),
    strictly: every key of the encoder present, nothing else, every shape equal, else a one-line UsageError naming
    how many keys are missing, unexpected or mis-shaped and the first few. Returns the layout's name."""
    check_file(path, "--vision-weights")
    if path.endswith(".safetensors"):
        raise UsageError(f"--vision-weights {path}: safetensors files are not read (no such dependency); use the "
                         "same weights as a PyTorch file (e.g. open_clip_pytorch_model.bin of the same repository)")
    open_clip_config_check(path)
    found = vision_state_dict(read_checkpoint(path, "--vision-weights"))
    if found is None:
        raise UsageError(f"--vision-weights {path}: no image-encoder weights in a known layout (the layouts: "
                         "docs/released-weights.md)")
    layout, weights, outside = found
    own = visual.state_dict()
    first = lambda keys: ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")  # noqa: E731
    problems = []
    if outside:
        problems.append(f"{len(outside)} key(s) outside the image encoder ({first(outside)})")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    misshaped = [f"{k} {tuple(weights[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                 for k in own if k in weights and weights[k].shape != own[k].shape]
    for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "mis-shaped")):
        if keys:
            problems.append(f"{len(keys)} {what} ({first(keys)})")
    if problems:
        raise UsageError(f"--vision-weights {path} ({layout}): does not fit the image encoder of --model: "
                         f"{'; '.join(problems)}")
    visual.load_state_dict(weights, strict=True)  # copies into the model's fp32 parameters
    return layout


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
    with warnings.catch_warnings():  # torch.jit.save's FutureWarning: TorchScript is the format clip.load reads
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(path, lambda f: torch.jit.save(traced, f))


def vit_forward(visual, x, tokens=False):
    """CLIP's VisionTransformer.forward (clip/model.py) written out, so that the per-token embeddings are available
    without changing the clip package; the project's one ViT forward (ImageEncoder calls it).

    visual: a clip.model.VisionTransformer; x: (B, 3, R, R) CLIP-normalised pixels.
    Returns the class-token embedding ln_post(z_0) @ proj, (B, D), bit for bit what visual(x) returns; with
    tokens=True every token's embedding ln_post(z_i) @ proj, (B, 1 + P, D): the class token first, then the
    P = (R / patch)² patch tokens in row-major grid order (TGA-ZSR's attention maps need them)."""
    x = visual.conv1(x)  # (B, W, g, g), g = R / patch
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, P, W)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1 + P, W)
    x = visual.ln_pre(x)
    x = visual.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # CLIP's Transformer is sequence-first (L, B, W)
    proj = (lambda z: z @ visual.proj) if visual.proj is not None else (lambda z: z)  # noqa: E731
    # The class token alone, with CLIP's own ops and shapes: kernels chosen by shape (a GEMM over B rows rather than
    # B·(1+P)) could round differently, and the class token must equal encode_image exactly.
    out = proj(visual.ln_post(x[:, 0, :]))  # (B, D)
    if tokens:
        out = torch.cat([out.unsqueeze(1), proj(visual.ln_post(x[:, 1:, :]))], dim=1)  # (B, 1 + P, D)
    return out


class ImageEncoder(nn.Module):
    """CLIP's image encoder f_θ on images in [0, 1] (docs/methods.md): resizes (bicubic) to the model's resolution when
    needed and applies CLIP's mean/std inside, so attacks and ε-balls live in pixel space.
    forward(x) gives the (B, D) image embedding; forward(x, tokens=True), ViT only, the (B, 1 + P, D) embeddings of
    every token (vit_forward), class token first. Call it through the module (or its DDP wrapper), never a method
    beside forward, so that DDP sees every pass."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.resolution = visual.input_resolution
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, tokens=False):  # (B, 3, H, W) in [0, 1] -> (B, D) unnormalised features, or (B, 1 + P, D)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)  # clamp as PIL's bicubic does
        x = (x - self.mean) / self.std
        if isinstance(self.visual, VisionTransformer):
            features = vit_forward(self.visual, x, tokens)
        elif tokens:
            raise ValueError("per-token embeddings need a ViT image encoder; this one is a ResNet")
        else:
            features = self.visual(x)  # ResNet: CLIP's own forward
        state = _attack_grad_scaling.get()  # set by input_grad under fp16 autocast only
        if state is not None and features.dtype == torch.float16 and torch.is_grad_enabled():
            features = _ScaleGradPerSample.apply(features, state)
        return features

    def train(self, mode=True):
        """nn.Module.train, except that BatchNorm layers (CLIP's ResNet encoders) stay in eval mode: fine-tuning uses
        the pretrained running statistics and never updates them (docs/cluster.md), so the attack (eval mode) and the
        update see the same network, and the result does not depend on how the global batch is split across
        processes. ViTs have no BatchNorm."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


# fp16 attacks (docs/cluster.md). Under fp16 autocast the gradient that reaches the network's fp16 output from a
# confidently classified sample (≈ e^-margin at CLIP's logit scale 100) is below fp16's smallest number: it becomes
# exactly 0, sign(0) = 0, and PGD or APGD leave the image at its random start, so robust accuracy is inflated. While
# input_grad differentiates under fp16 autocast, ImageEncoder passes its output through _ScaleGradPerSample: the
# features go on in fp32, and on the way back each sample's fp32 gradient is multiplied by the power of two that
# brings its largest entry into [1, 2) before it is cast to fp16; input_grad divides the input gradient by the same
# factors (exact: powers of two). Per sample, because the samples of one batch can need factors 10^30 apart. In
# eval mode the samples of a batch are independent, so the result is the true input gradient up to fp16 rounding.
# The backward itself runs outside autocast: autocast is thread-local state that the backward inherits when it is
# called inside the context, and it would recompute the fp32 head's backward (cosine_sim's matmul) in fp16.
_attack_grad_scaling = contextvars.ContextVar("attack_grad_scaling", default=None)  # {"scale": (B,) or None}


class _ScaleGradPerSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, state):  # (B, ...) fp16 -> (B, ...) fp32
        ctx.dtype, ctx.state = features.dtype, state
        return features.float()

    @staticmethod
    def backward(ctx, grad):  # (B, ...) fp32 -> (B, ...) fp16, each sample scaled by 2^k
        if ctx.state.get("scale") is None:  # the first backward through the encoder fixes the factors
            peak = grad.flatten(1).abs().amax(1)  # (B,)
            usable = torch.isfinite(peak) & (peak > 0)
            # 2^k brings the peak to [1, 2); k ≤ 127 keeps 2^k finite in fp32 (a peak below 2^-127, a margin near 90
            # logits, then ends at ≥ 2^-22, still an fp16 number, instead of at inf)
            k = torch.clamp(-torch.floor(torch.log2(peak)), max=127.0)
            ctx.state["scale"] = torch.where(usable, torch.exp2(k), torch.ones_like(peak))
        scale = ctx.state["scale"].view(-1, *[1] * (grad.dim() - 1))
        return (grad * scale).to(ctx.dtype), None


def input_grad(loss_fn, x, has_aux=False, backward=True):
    """∇_x loss_fn(x) for a scalar loss: the one place where every attack differentiates, w.r.t. the input only
    (torch.autograd.grad), so parameters never accumulate .grad. has_aux=True: loss_fn returns (loss, aux) and this
    returns (grad, aux) (APGD reads its per-sample losses and logits from aux). backward=False: the gradient is None
    and only the forward runs, computed exactly as with the backward (autograd on, the same kernels and casts), for
    an aux whose point's gradient would go unused (APGD's last iterate).
    Under fp16 autocast the gradient is scaled per sample inside ImageEncoder and unscaled here, so that no sample's
    gradient underflows to 0 (see _ScaleGradPerSample); the encoder must see x's batch (one row per row of x)."""
    x = x.detach().requires_grad_(True)
    state = {}  # ImageEncoder scales only fp16 outputs (fp16 autocast, whether entered here or inside loss_fn)
    token = _attack_grad_scaling.set(state)
    try:
        out = loss_fn(x)
        loss, aux = out if has_aux else (out, None)
        if not backward:
            return (None, aux) if has_aux else None
        with torch.autocast(x.device.type, enabled=False):  # backward ops keep their forward dtypes (see above)
            grad, = torch.autograd.grad(loss, x)
    finally:
        _attack_grad_scaling.reset(token)
    if state.get("scale") is not None:
        grad = grad / state["scale"].view(-1, *[1] * (x.dim() - 1)).to(grad.dtype)  # (B, 3, H, W)
    return (grad, aux) if has_aux else grad


def tokenize(model, texts):
    """CLIP's tokens of `texts` for `model`, (len(texts), context length): longer texts are truncated."""
    return clip.tokenize(texts, context_length=model.context_length, truncate=True)


@torch.no_grad()
def text_features(model, prompts, device, batch_size=500):
    """L2-normalised text embeddings g_φ(t) of `prompts`, (len(prompts), D) in fp32. Computed once per prompt set."""
    feats = []
    for i in range(0, len(prompts), batch_size):
        feats.append(model.encode_text(tokenize(model, prompts[i:i + batch_size]).to(device)).float())
    return F.normalize(torch.cat(feats), dim=-1)


def cosine_sim(image_features, text_feats):
    """s(x, t) = <f(x)/|f(x)|, g(t)/|g(t)|>: (B, D) raw image features, (C, D) normalised text -> (B, C), fp32.
    Computed outside autocast: the similarities, the logits and every loss on them stay fp32 under AMP, so only the
    encoder runs in reduced precision (and fp16 attacks can rescale their gradients at its output)."""
    with torch.autocast(image_features.device.type, enabled=False):
        return F.normalize(image_features.float(), dim=-1) @ text_feats.float().t()


def compile_encoder(encoder, enabled):
    """torch.compile(encoder) with --compile, else the encoder itself. The compiled module shares the encoder's
    parameters and follows its .train()/.eval(); each mode and grad setting compiles once, on first use."""
    return torch.compile(encoder) if enabled else encoder


def frozen_copy(module):
    """The original encoder f_θorig: a copy made before training that never gets gradients."""
    return copy.deepcopy(module).requires_grad_(False).eval()


def prompts_for(class_names, template="This is a photo of a {}."):
    return [template.format(c) for c in class_names]


# ------------------------------------------------------------------------------------------------ distributed and AMP
# How long ranks wait in a collective for work that only one rank does (a download, unpacking a dataset, pretraining
# the demo CLIP): hours, not the default process group's 10 (NCCL) or 30 (gloo) minutes, which catch hung steps.
SETUP_TIMEOUT = timedelta(hours=float(os.environ.get("CLIP_AFT_SETUP_TIMEOUT_HOURS", "6")))


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    cpu_group: object = None  # a gloo group with SETUP_TIMEOUT, for host-side waits and flags (None: one process)

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process. NCCL on CUDA, gloo on CPU, plus
    a gloo group on the host (Dist.cpu_group) whose collectives wait up to SETUP_TIMEOUT."""
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
    return Dist(rank, world, local_rank, device, torch_dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT))


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(t, dist):
    if dist.world > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def all_gather_with_grad(t, dist):
    """(b, ...) on each of W processes -> (W·b, ...), rank-major: the global batch in the order GlobalBatchSampler
    splits it. This rank's rows keep their autograd graph and the other ranks' rows are constants, so a loss of the
    global batch back-propagates through this rank's rows only (DDP then averages over ranks: scale the loss by W)."""
    if dist.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.world)]
    torch_dist.all_gather(parts, t.detach().contiguous())
    parts[dist.rank] = t
    return torch.cat(parts)


def first_error(error, dist):
    """The message of the first rank's error (a UsageError, or None on a rank that has none), on every rank: a
    collective, so that no rank waits for one that gave up."""
    if dist.world == 1:
        return None if error is None else str(error)
    errors = [None] * dist.world
    torch_dist.all_gather_object(errors, None if error is None else str(error), group=dist.cpu_group)
    return next((e for e in errors if e is not None), None)


def raise_on_every_rank(error, dist):
    """Raise any rank's UsageError (or nothing) on every rank."""
    message = first_error(error, dist)
    if message is not None:
        raise UsageError(message)


def prepare_files(dist, fn):
    """fn(may_write) on global rank 0 first, then on the first rank of every other node, then on every other rank
    (may_write=False: they only read), each group waiting for the one before (Dist.cpu_group, SETUP_TIMEOUT): for
    work that writes files that several processes read (a download, unpacking a dataset, a cache). On a shared
    filesystem rank 0 writes and the others find the files; on node-local disks the first rank of each node writes.
    fn must write atomically (temp file + rename). A failure on any rank stops every rank (the failing rank prints
    why). Returns fn's value."""
    if dist is None or dist.world == 1:
        return fn(True)
    result, error, failed = None, None, False
    for mine, may_write in ((dist.rank == 0, True), (dist.local_rank == 0 and dist.rank != 0, True),
                            (dist.local_rank != 0, False)):
        if mine:
            try:
                result = fn(may_write)
            except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other ranks)
                error = e
                if dist.rank != 0:  # run_main prints rank 0's errors only
                    print(f"error (rank {dist.rank}): {e}", file=sys.stderr, flush=True)
        flag = torch.tensor([error is not None], dtype=torch.int32)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=dist.cpu_group)
        if flag.item():
            failed = True
            break
    if error is not None:
        raise error
    if failed:
        raise UsageError("another process failed while preparing files (its error is printed above)")
    return result


class Preemption:
    """The process's signals, from run_main's start to its end (one instance, SIGNALS). A cluster's preemption notice
    (SIGTERM: SLURM, Kubernetes, torchrun passing it on; SIGUSR1: SLURM's --signal=USR1@SECONDS) and Ctrl-C (SIGINT)
    ask the run to save and stop (exit status PREEMPTED, or INTERRUPTED for SIGINT). How soon depends on the work in
    hand, a stack of scopes:
      - interruptible (setup, an evaluation batch's attacks, the demo's evaluation): the handler raises Stop at
        once, between two Python operations; nothing there is half-written (files are written atomically), and a
        thrown-away evaluation batch is redone by the rerun.
      - deferred (training from Run.start_timer to its final model, evaluate.py's loop over batches): the handler
        only sets a flag, read between steps / batches by `requested(dist)` (a collective of every rank's flag on
        the host-side group, so every rank stops after the same step), and the run saves, then raises Preempted.
    A signal that repeats within REPEAT_S seconds is the same request (torchrun passes on to its processes the
    signal that the scheduler or the terminal also sent them); a second SIGINT after that raises KeyboardInterrupt
    at once, in any scope (nothing more is saved). DataLoader workers ignore all three (worker_ignores_signals):
    their main process decides when to stop and stops them."""
    HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # two preemption notices and Ctrl-C
    REPEAT_S = 1.0

    def __init__(self):
        self.received = None  # the first signal's name, once one arrived
        self.received_at = 0.0
        self.agreed = None  # the exit status every rank agreed on in requested() (a signal on any rank)
        self.scopes = []  # innermost last: an interruptible scope's `when` (what its Stop says), None: deferred
        self.previous = {}  # signal -> the handler before install()

    def start(self):
        """A run starts: no signal received yet, no scope; the handlers installed (run_main)."""
        self.end()
        self.install()

    def end(self):
        """A run ends: the handlers from before, and nothing of this run's signals left for the next one."""
        self.restore()
        self.__init__()

    def install(self):
        """Handle SIGTERM, SIGUSR1 and SIGINT in this process (the main thread alone may) until restore()."""
        if threading.current_thread() is threading.main_thread() and not self.previous:
            self.previous = {s: signal.signal(s, self._handler) for s in self.HANDLED}

    def restore(self):
        """The handlers from before install()."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    @property
    def status(self):
        if self.agreed is not None:
            return self.agreed
        return INTERRUPTED if self.received == "SIGINT" else PREEMPTED

    def stop(self, when):
        """The Stop to raise for the signal received (status and a line saying `when`)."""
        what = "interrupted" if self.status == INTERRUPTED else "preempted"
        return Stop(f"{what} ({self.received or 'signal to another process'}) {when}; rerun the same command "
                    f"(exit status {self.status})", self.status)

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum).name, now
        elif now - self.received_at < self.REPEAT_S:
            return  # the same request, delivered twice (the scheduler or terminal, and torchrun)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.scopes and self.scopes[-1] is not None:
            raise self.stop(self.scopes[-1])

    @contextlib.contextmanager
    def interruptible(self, when):
        """A scope in which a signal stops the work at once (Stop, its message ending with `when`), as does one
        that arrived before it. Outside run_main (a test calling a script's main) it installs the handlers for
        itself and restores them after."""
        if self.received is not None:
            raise self.stop(when)
        own = not self.previous
        if own:
            self.install()
        self.scopes.append(when)
        try:
            yield
        finally:
            self.scopes.pop()
            if own:
                self.restore()

    def defer(self, deferred=True):
        """Enter (or, deferred=False, leave) a deferred scope: signals only set the flag until it is left."""
        if deferred:
            self.scopes.append(None)
        elif self.deferred:
            self.scopes.pop()

    @property
    def deferred(self):
        """Inside a deferred scope (and no interruptible one within it)."""
        return bool(self.scopes) and self.scopes[-1] is None

    def check(self, when):
        """Raise Stop if a signal arrived (work that a deferred scope finished, with nothing left to save)."""
        if self.received is not None:
            raise self.stop(when)

    def requested(self, dist):
        """True on every rank as soon as any rank has received a signal (a collective: call it on all ranks); the
        exit status then agreed is INTERRUPTED if any rank had SIGINT, else PREEMPTED."""
        flag = torch.tensor([0 if self.received is None else self.status], dtype=torch.int32)
        if dist.world > 1:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=dist.cpu_group)
        if flag.item():
            self.agreed = int(flag.item())
        return bool(flag.item())


SIGNALS = Preemption()  # this process's: installed by run_main


def worker_ignores_signals(worker_id=None):
    """DataLoader workers' worker_init_fn: a cluster signals every process of the job and Ctrl-C every process of
    the terminal's group, and a worker that died of it would fail its main process's next batch before that could
    save; the main process decides when to stop, and stops its workers (stop_loaders)."""
    for s in Preemption.HANDLED:
        signal.signal(s, signal.SIG_IGN)


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


# --------------------------------------------------------------------------------------------------------------- data
# Image files read by the folder and caption-file readers (the union of PIL's common formats; .gif included).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".gif", ".tif", ".tiff", ".webp")
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL's "broken image"


# training data: ImageNet, ImageFolder, synthetic (the demo's data is in the demo section)
def to_rgb(image):
    """PIL image -> RGB. A module-level function, not a lambda, so that datasets pickle: DataLoader workers started
    with `spawn` or `forkserver` (macOS; Linux's default from Python 3.14) receive the dataset pickled."""
    return image.convert("RGB")


def image_transform(resolution):
    """Resize (bicubic) + CenterCrop to the model's resolution, to a tensor in [0, 1] (no normalisation here)."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.Lambda(to_rgb),
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


def read_class_names(path, n_classes, what="the dataset"):
    """A --class-names file: one name per line, in sorted folder order, exactly `n_classes` of them."""
    names = [" ".join(p) for p in read_class_name_lines(path)]
    if len(names) != n_classes:
        raise UsageError(f"--class-names {path}: has {len(names)} names, {what} has {n_classes} classes")
    return names


def read_class_name_lines(path):
    """The non-empty lines of a --class-names file, each split into words (a 'wnid name' line: the id, then the
    name's words)."""
    if not os.path.isfile(path):
        raise UsageError(f"--class-names {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [line.strip().split(None, 1) for line in f if line.strip()]


def refine_class_name(name):
    """Folder name -> prompt-ready class name: '_' and '-' become spaces, lower case (docs/evaluation.md)."""
    return re.sub(r"[_\-]+", " ", name).strip().lower()


def imagenet_meta(root):
    """ImageNet's devkit in `root` as ({wnid: (first synonym, ...)}, [wnid of each val image]), or None when it has
    neither torchvision's meta.bin nor ILSVRC2012_devkit_t12.tar.gz. The archive is parsed in a temporary directory
    and nothing is written into `root`: a dataset folder may be read-only, and every rank reads it at once."""
    from torchvision.datasets.imagenet import META_FILE
    if os.path.isfile(os.path.join(root, META_FILE)):
        return torch.load(os.path.join(root, META_FILE), weights_only=True)
    archive = os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")
    if not os.path.isfile(archive):
        return None
    import tarfile
    import tempfile
    from scipy.io import loadmat
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            data = os.path.join(tmp, "ILSVRC2012_devkit_t12", "data")
            synsets = loadmat(os.path.join(data, "meta.mat"), squeeze_me=True)["synsets"]
            with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt")) as f:
                val_ids = [int(line) for line in f if line.strip()]
    except (OSError, KeyError, ValueError, tarfile.TarError) as e:
        raise UsageError(f"{archive}: not a readable ImageNet devkit ({type(e).__name__}: {e})")
    leaves = [s for s in synsets if s[4] == 0]  # (ILSVRC2012_ID, WNID, words, gloss, num_children, ...): classes
    wnid_of = {int(s[0]): str(s[1]) for s in leaves}
    return {str(s[1]): tuple(str(s[2]).split(", ")) for s in leaves}, [wnid_of[i] for i in val_ids]


def training_dataset(spec, resolution, class_names_file=None, synthetic_size=None, seed=0):
    """(dataset of (image in [0, 1], label, unreadable), class names) for `--data`.

    spec: `synthetic`; `demo`; an ImageNet root with the devkit (ILSVRC2012_devkit_t12.tar.gz or meta.bin) and
    train/ (class names = first synonym); a folder with train/; or an ImageFolder directory (class names from the
    folder names, or one per line in --class-names, in sorted folder order). Every name is refined for the prompts
    as evaluation refines it. An unreadable image is replaced (SkipUnreadable) and flagged.
    """
    if spec == "synthetic":
        ds = SyntheticImages(10_000 if synthetic_size is None else synthetic_size, 1000, resolution, seed)
        return SkipUnreadable(ds), ds.classes
    if spec == "demo":
        ds = DemoImages(DEMO_PROXY, 64, resolution, seed=1)
        return SkipUnreadable(ds), ds.classes
    if not os.path.isdir(spec):
        raise UsageError(f"--data {spec}: no such directory (expected an ImageNet root with train/ and the devkit, "
                         "an ImageFolder directory, 'synthetic' or 'demo')")
    from torchvision import datasets
    root = os.path.join(spec, "train") if os.path.isdir(os.path.join(spec, "train")) else spec
    try:
        ds = datasets.ImageFolder(root, transform=image_transform(resolution))
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"--data {spec}: not an ImageFolder directory ({e})")
    names = ds.classes
    if all(is_wnid(c) for c in ds.classes) and class_names_file is None:  # ImageNet: names from its devkit
        meta = imagenet_meta(spec)
        if meta is None:
            raise UsageError(f"--data {spec}: class folders are WordNet ids; put ILSVRC2012_devkit_t12.tar.gz in "
                             f"{spec} or give --class-names FILE (one name per line, in sorted folder order)")
        missing = [w for w in ds.classes if w not in meta[0]]
        if missing:
            raise UsageError(f"--data {spec}: the devkit has no class {missing[0]} ({len(missing)} missing)")
        names = [meta[0][w][0] for w in ds.classes]  # first synonym
    if class_names_file is not None:
        names = read_class_names(class_names_file, len(names))
    check_classes(f"--data {spec}", names)
    if not any(readable(ds, i) for i in range(len(ds))):  # stops at the first readable image
        raise UsageError(f"--data {spec}: none of its {len(ds)} images can be read")
    return SkipUnreadable(ds), [refine_class_name(n) for n in names]


def readable(dataset, i):
    """Whether item i of an image dataset can be read (SkipUnreadable replaces the items that cannot)."""
    try:
        dataset[i]
        return True
    except UNREADABLE_IMAGE_ERRORS:
        return False


def check_classes(what, names):
    """Zero-shot classification chooses between class prompts: with one class every image is 'correct' and the loss
    is 0. Refuse fewer than two, in one line."""
    if len(names) < 2:
        raise UsageError(f"{what}: has {len(names)} class ({', '.join(names) or 'none'}); zero-shot classification "
                         "needs at least two")


class SkipUnreadable(torch.utils.data.Dataset):
    """(*item, unreadable) of a training dataset: an item that cannot be read (a corrupt or missing image) is
    replaced by the next readable one and `unreadable` is 1. The substitute depends only on the index, so the
    batches are the same with any number of processes or DataLoader workers and after a resume, and the sum of
    `unreadable` over an epoch counts each unreadable image once (Run reports it, and stops the run when more than
    --max-unreadable of the dataset is unreadable)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        for k in range(len(self)):
            try:
                return (*self.dataset[(i + k) % len(self)], int(k > 0))
            except UNREADABLE_IMAGE_ERRORS:
                continue
        raise RuntimeError("no readable image left in the training set (did the files change during training?)")


def class_labels(dataset):
    """The class of each item of a training dataset, without reading an image (for --subset-per-class), or None
    when it has no classes: an ImageFolder's targets, the demo's concepts, the class folder of each file of a folder
    of images (FARE's reader); caption data has none, unless it is class-captioned (advflyp.py --class-captions)."""
    if isinstance(dataset, Captioned):
        return class_labels(dataset.dataset)
    if hasattr(dataset, "targets"):  # torchvision's ImageFolder
        return list(dataset.targets)
    if isinstance(dataset, DemoImages):
        return [i % len(dataset.concepts) for i in range(len(dataset))]
    if isinstance(dataset, ImageFiles):
        folders = [os.path.dirname(p) for p in dataset.images]
        ids = {f: k for k, f in enumerate(sorted(set(folders)))}
        return [ids[f] for f in folders]
    return None


def subset_indices(n, size=None, per_class=None, labels=None, first=False, seed=0):
    """Sorted indices of the samples a --subset keeps: `size` of the n samples, or `per_class` of each class
    (`labels`: the class of each sample; a class with fewer keeps them all); a fixed random choice (generator seeded
    with `seed`), or the first ones in index order (first=True)."""
    g = torch.Generator().manual_seed(seed)
    if per_class is None:
        order = torch.arange(n) if first else torch.randperm(n, generator=g)
        return sorted(order[:size].tolist())
    labels = torch.as_tensor(labels)
    keep = []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero()[:, 0]  # in index order
        keep += (members if first else members[torch.randperm(len(members), generator=g)])[:per_class].tolist()
    return sorted(keep)


def take_subset(dataset, args, log=None):
    """The training set a run uses: `dataset` (SkipUnreadable-wrapped), or with --subset / --subset-per-class the
    samples subset_indices keeps, in their order (an unreadable one is then replaced by the next kept one). The
    choice uses seed 0 whatever --seed is, so that runs with different seeds train on the same samples."""
    if args.subset is None and args.subset_per_class is None:
        return dataset
    inner, first = dataset.dataset, args.subset_order == "first"
    if args.subset is not None:
        if args.subset > len(inner):
            raise UsageError(f"--subset {args.subset}: --data {args.data} has only {len(inner)} samples")
        keep, how = subset_indices(len(inner), size=args.subset, first=first), f"--subset {args.subset}"
    else:
        labels = class_labels(inner)
        if labels is None:
            raise UsageError(f"--subset-per-class: --data {args.data} has no classes to take them from (image-caption "
                             "pairs, synthetic data); use --subset N")
        keep = subset_indices(len(inner), per_class=args.subset_per_class, labels=labels, first=first)
        sizes = collections.Counter(labels)
        short = sum(1 for k in sizes.values() if k < args.subset_per_class)
        how = (f"--subset-per-class {args.subset_per_class}, {len(sizes)} classes"
               + (f", {short} with fewer samples kept whole" if short else ""))
    if log is not None:
        log(f"training on {len(keep)} of the {len(inner)} samples of --data {args.data} ({how}, "
            f"{'the first ones' if first else 'a fixed random choice'})")
    return SkipUnreadable(torch.utils.data.Subset(inner, keep))


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


def usable_workers(workers):
    """--workers, but never more than the CPUs this process may run on (more would only compete for them, and
    PyTorch warns)."""
    return min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose iterators (and so worker processes) stop_loaders can find and stop."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        _LIVE_ITERATORS.add(iterator)
        return iterator


_LIVE_ITERATORS = weakref.WeakSet()


def stop_loaders():
    """Stop the worker processes of every Loader iterator still alive: torch's own shutdown (a sentinel to each
    worker, then join), then SIGKILL for any that did not end (a worker stuck in a read; workers ignore SIGTERM).
    run_main calls it on every way out: an iterator kept alive by an exception's traceback, or a persistent one,
    would otherwise leave its workers to Python's exit, which waits for them forever."""
    for iterator in list(_LIVE_ITERATORS):
        workers = list(getattr(iterator, "_workers", []))
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        _LIVE_ITERATORS.discard(iterator)


@atexit.register  # registered after multiprocessing's own exit handler (imported with torch), so it runs first
def _kill_leftover_workers():
    """At interpreter exit, workers still alive (stop_loaders was not reached: a script's main called without
    run_main) are killed rather than joined: they ignore the SIGTERM with which multiprocessing would end them."""
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kills as worker failures
    for p in children:
        p.kill()
        p.join(timeout=5)


def make_loader(dataset, batch_sampler, workers, device):
    """Loader with workers (at most the usable CPUs), pinned memory and persistent workers on CUDA."""
    cuda, workers = device.type == "cuda", usable_workers(workers)
    return Loader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=cuda,
                  persistent_workers=cuda and workers > 0, worker_init_fn=worker_ignores_signals)


# caption data (AdvFLYP: web image-caption pairs). Every caption dataset yields (image in [0, 1], caption,
# unreadable), through SkipUnreadable like the labelled training sets: a pair whose image (or caption file) cannot
# be read is replaced by the next readable pair in the list.
class CaptionPairs(torch.utils.data.Dataset):
    """Image files with captions: `images[i]` is a path and `caption(i)` its text; an unreadable pair raises."""

    def __init__(self, images, captions, resolution, source):
        self.images, self.captions, self.source = images, captions, source
        self.transform = image_transform(resolution)
        if not images:
            raise UsageError(f"--data {source}: has no image-caption pairs")
        if not any(readable(self, i) for i in range(len(images))):  # stops at the first readable pair
            raise UsageError(f"--data {source}: none of its {len(images)} images can be read")

    def __len__(self):
        return len(self.images)

    def caption(self, i):
        return self.captions[i]

    def __getitem__(self, i):
        with Image.open(self.images[i]) as im:
            return self.transform(im), self.caption(i)


class CaptionFiles(CaptionPairs):
    """Captions in files, read when the item is: caption_file(image) (img2dataset's SHARD/KEY.txt beside
    SHARD/KEY.jpg, or the AdvFLYP LAION release's partX/captions/KEY.txt for partX/images/KEY.jpg)."""

    def caption(self, i):
        with open(caption_file(self.images[i]), encoding="utf-8", errors="replace") as f:
            return f.read().strip()


class Captioned(torch.utils.data.Dataset):
    """(image, caption) from a dataset whose items are (image, caption), or (image, label) captioned with its class's
    caption: `class_captions[label]` (advflyp.py --class-captions: the class prompts), by default 'a photo of a
    {class name}.' (generated data)."""

    def __init__(self, dataset, class_captions=None):
        self.dataset = dataset
        self.class_captions = class_captions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        if isinstance(target, str):
            return image, target
        caption = (self.class_captions[target] if self.class_captions is not None
                   else f"a photo of a {self.dataset.classes[target]}.")
        return image, caption


def read_caption_table(path, img_key="filepath", caption_key="title", separator=None):
    """(image paths, captions) from a CSV/TSV in open_clip's convention: one row per pair, a header naming the
    image-path column `img_key` and the caption column `caption_key` (None: no caption column is needed, and the
    captions returned are None). The separator defaults to ',' for .csv and a tab otherwise (open_clip's default);
    relative image paths are resolved against the file's folder."""
    import csv
    if separator is None:
        separator = "," if path.lower().endswith(".csv") else "\t"
    separator = {"\\t": "\t", "tab": "\t"}.get(separator, separator)
    if len(separator) != 1:
        raise UsageError(f"--csv-separator {separator!r}: must be one character")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            columns = reader.fieldnames or []
            missing = [key for key in (img_key, caption_key) if key is not None and key not in columns]
            if missing:
                flags = "--csv-img-key, --csv-caption-key" if caption_key is not None else "--csv-img-key"
                raise UsageError(f"--data {path}: no column {' or '.join(map(repr, missing))} (separator "
                                 f"{separator!r}, columns {columns}); set {flags}, --csv-separator")
            rows = [(row[img_key] or "", (row[caption_key] or "") if caption_key is not None else None)
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--data {path}: not a readable CSV/TSV file ({e})")
    folder = os.path.dirname(os.path.abspath(path))
    images = [os.path.join(folder, p) for p, _ in rows]  # join keeps absolute paths as they are
    return images, None if caption_key is None else [c for _, c in rows]


def read_caption_records(path):
    """(image paths, captions) from a JSON list, or a JSON-lines file, of {"image": path, "caption": text} records,
    in the file's order: the AdvFLYP code's `laion_index.json` (paths relative to its folder) and its VLM-captioned
    ImageNet (`all_captions.jsonl`). Relative paths are resolved against the file's folder."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
        folder = os.path.dirname(os.path.abspath(path))
        return ([os.path.join(folder, r["image"]) for r in records], [str(r["caption"]) for r in records])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--data {path}: not a list of {{\"image\": path, \"caption\": text}} records "
                         f"({type(e).__name__}: {str(e)[:120]})")


def caption_file(image):
    """The caption file of an image: KEY.txt beside KEY.jpg (img2dataset's `files` format), or, for an image in a
    folder named `images`, captions/KEY.txt beside that folder (the AdvFLYP LAION release: partX/images/KEY.jpg and
    partX/captions/KEY.txt)."""
    folder, name = os.path.split(image)
    beside = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
    if os.path.basename(folder) == "images" and not os.path.exists(beside):
        return os.path.join(os.path.dirname(folder), "captions", os.path.splitext(name)[0] + ".txt")
    return beside


def find_caption_files(root):
    """(the image paths with a caption file (caption_file), in path order: a folder's files, then its sorted
    subfolders; the number of images without one) under `root`, recursively (hidden folders skipped):
    img2dataset's `files` output (ROOT/00000/000000000.jpg with ROOT/00000/000000000.txt) or the AdvFLYP LAION
    release without its index (ROOT/part0/images/000000.jpg with ROOT/part0/captions/000000.txt)."""
    images, uncaptioned = [], 0
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        names = set(files)
        captions = (set(os.listdir(os.path.join(os.path.dirname(folder), "captions")))
                    if os.path.basename(folder) == "images"
                    and os.path.isdir(os.path.join(os.path.dirname(folder), "captions")) else set())
        for n in sorted(names):
            if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS:
                key = os.path.splitext(n)[0] + ".txt"
                if key in names or key in captions:
                    images.append(os.path.join(folder, n))
                else:
                    uncaptioned += 1
    return images, uncaptioned


LAION_INDEX = "laion_index.json"  # the AdvFLYP LAION release's index of its pairs, read in place of the folders


def caption_dataset(spec, resolution, img_key="filepath", caption_key="title", separator=None,
                    synthetic_size=None, seed=0, log=None):
    """Dataset of (image in [0, 1], caption, unreadable) for `--data` of AdvFLYP (docs/advflyp.md): a CSV/TSV file of
    image paths and captions; a .json/.jsonl file of {"image", "caption"} records; a folder with a laion_index.json
    (the AdvFLYP LAION release: its records, in their order); a folder of images with caption files (img2dataset's
    `files` output, or the LAION release without its index); `synthetic` (random images captioned with random class
    names) or `demo` (captioned images of the demo's proxy concepts, the images agft.py's demo trains on).
    log: where to say how many images of a folder have no caption file (they are left out)."""
    if spec == "synthetic":
        size = 10_000 if synthetic_size is None else synthetic_size
        return SkipUnreadable(Captioned(SyntheticImages(size, 1000, resolution, seed)))
    if spec == "demo":
        return SkipUnreadable(Captioned(DemoImages(DEMO_PROXY, 64, resolution, seed=1, captions=True)))
    index = os.path.join(spec, LAION_INDEX)
    if os.path.isfile(spec) and spec.lower().endswith((".json", ".jsonl")) or os.path.isfile(index):
        path = spec if os.path.isfile(spec) else index
        images, captions = read_caption_records(path)
        return SkipUnreadable(CaptionPairs(images, captions, resolution, path))
    if os.path.isfile(spec):
        images, captions = read_caption_table(spec, img_key, caption_key, separator)
        return SkipUnreadable(CaptionPairs(images, captions, resolution, spec))
    if os.path.isdir(spec):
        images, uncaptioned = find_caption_files(spec)
        if not images:
            raise UsageError(f"--data {spec}: no image with a caption file (expected img2dataset's `files` output: "
                             "00000/000000000.jpg with 00000/000000000.txt, or the AdvFLYP LAION release: "
                             "part0/images/000000.jpg with part0/captions/000000.txt)")
        if uncaptioned and log is not None:
            log(f"--data {spec}: {count(uncaptioned, 'image')} without a caption file beside it left out, "
                f"{len(images)} with one")
        return SkipUnreadable(CaptionFiles(images, None, resolution, spec))
    raise UsageError(f"--data {spec}: no such file or directory (expected a CSV/TSV of image paths and captions, "
                     "an img2dataset output folder, 'synthetic' or 'demo')")


# images alone (FARE: no labels, no text). Such a method reads any training data of the other scripts and
# uses only the images, so the layout of a folder (class folders, img2dataset shards, captions) never matters.
class ImageFiles(CaptionPairs):
    """Image files without a target: items are (image, ""); an unreadable image raises (SkipUnreadable replaces it)."""

    def __init__(self, images, resolution, source):
        super().__init__(images, None, resolution, source)

    def caption(self, i):
        return ""


def find_images(root):
    """Sorted paths of every image file (IMAGE_EXTENSIONS) under `root`, recursively; hidden folders are skipped."""
    images = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        images += [os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(images)


def image_dataset(spec, resolution, img_key="filepath", separator=None, synthetic_size=None, seed=0):
    """(dataset of (image in [0, 1], target, unreadable), a description of what is read) for `--data` of a method
    that trains on images alone (FARE); the target (a label, or "") is never used.

    spec: `synthetic`; `demo` (the proxy-concept images the other scripts' demos train on); a file: a CSV/TSV with an
    image-path column `img_key` (advflyp.py's caption table reads as it is: other columns are not read); a directory:
    every image under its train/ if it has one (an ImageNet root, as training_dataset reads it), else every image
    under it, recursively (an ImageFolder, an img2dataset output folder, a plain folder of images), in sorted path
    order. A file is a table and a directory is images, so no layout is guessed. An unreadable image is replaced by
    the next readable one (SkipUnreadable) and flagged."""
    if spec in ("synthetic", "demo"):
        return training_dataset(spec, resolution, synthetic_size=synthetic_size, seed=seed)[0], spec
    if os.path.isfile(spec):
        images = (read_caption_records(spec)[0] if spec.lower().endswith((".json", ".jsonl"))
                  else read_caption_table(spec, img_key, None, separator)[0])
        if not images:
            raise UsageError(f"--data {spec}: lists no images")
        what = "the images" if spec.lower().endswith((".json", ".jsonl")) else f"the image column '{img_key}'"
        return SkipUnreadable(ImageFiles(images, resolution, spec)), f"{what} of {spec}"
    if not os.path.isdir(spec):
        raise UsageError(f"--data {spec}: no such file or directory (expected a CSV/TSV of image paths, a folder of "
                         "images such as an ImageNet root, an ImageFolder or an img2dataset output folder, "
                         "'synthetic' or 'demo')")
    root = os.path.join(spec, "train") if os.path.isdir(os.path.join(spec, "train")) else spec
    images = find_images(root)
    if not images:
        raise UsageError(f"--data {spec}: no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return SkipUnreadable(ImageFiles(images, resolution, spec)), f"every image under {root}"


# labelled evaluation images: what AdvFLYP's early stopping (validation_dataset) and evaluate.py's benchmark
# (eval_datasets.py, which has every other dataset) share: class folders, WordNet ids named, TinyImageNet, the last
# checks. Templates and the class names torchvision lacks are data in data_lists/.
DATA_LISTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_lists")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def read_data_list(name):
    """data_lists/NAME: 'key<TAB>value' lines -> dict (file order), or plain lines -> list."""
    with open(os.path.join(DATA_LISTS, name), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    return dict(line.split("\t", 1) for line in lines) if name.endswith(".tsv") else lines


def is_wnid(name):
    return re.fullmatch(r"n\d{8}", name) is not None


class FileList(torch.utils.data.Dataset):
    """Images from a list of (path, label), read with PIL (RGB) and `transform`."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def image_folder(root, transform, exclude=(), recursive=True):
    """An ImageFolder-layout directory root/<class>/<image> as (FileList, sorted class folder names). Sorted file
    order, so a --samples subset and the sharding are the same on every machine."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name not in exclude
                     and not e.name.startswith("."))
    samples = []
    for label, c in enumerate(classes):
        folder = os.path.join(root, c)
        walk = os.walk(folder, followlinks=True) if recursive else [(folder, None, os.listdir(folder))]
        files = sorted(os.path.join(d, f) for d, _, fs in walk for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
        samples += [(f, label) for f in files]
    if not samples:
        raise UsageError(f"{root}: no images found (expected {root}/<class>/<image>)")
    return FileList(samples, transform), classes


def wnid_names(name, wnids, root, class_names_file=None):
    """Class names of WordNet ids: from --class-names ('wnid name' lines, or one name per line in sorted wnid
    order) or else from ImageNet's devkit in <root>/imagenet through torchvision (first synonym)."""
    if class_names_file is not None:
        pairs = read_class_name_lines(class_names_file)
        if not all(len(p) == 2 and is_wnid(p[0]) for p in pairs):  # one name per line
            return read_class_names(class_names_file, len(wnids),
                                    f"{name} ('wnid name' lines would serve several datasets at once)")
        table = dict(pairs)
    else:
        base = os.path.join(root, "imagenet")
        meta = imagenet_meta(base)
        if meta is None:
            raise UsageError(f"{name}: the class folders are WordNet ids; put ImageNet's ILSVRC2012_devkit_t12.tar.gz "
                             f"(or torchvision's meta.bin) in {base}, or give --class-names FILE ('wnid name' lines)")
        table = {w: names[0] for w, names in meta[0].items()}
    missing = [w for w in wnids if w not in table]
    if missing:
        raise UsageError(f"{name}: no class name for {len(missing)} WordNet id(s), e.g. {missing[0]}")
    return [table[w] for w in wnids]


def tiny_imagenet(root, transform, download):
    """TinyImageNet's validation set (its archive's layout, or val/ sorted into val/<wnid>/): (dataset, class names,
    WordNet ids). A loader of eval_datasets.EVAL_DATASETS, and AdvFLYP's early-stopping set."""
    base = os.path.join(root, "tiny-imagenet-200")
    if download and not os.path.isdir(base):
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(TINY_IMAGENET_URL, root)
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    with open(os.path.join(base, "words.txt"), encoding="utf-8") as f:
        words = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    annotations = os.path.join(base, "val", "val_annotations.txt")
    if os.path.isfile(annotations):  # the archive's layout: val/images/*.JPEG + one label line per image
        label = {w: i for i, w in enumerate(wnids)}
        with open(annotations) as f:
            rows = [line.split("\t")[:2] for line in f if line.strip()]
        ds = FileList(sorted((os.path.join(base, "val", "images", im), label[w]) for im, w in rows), transform)
    else:  # val/ already sorted into val/<wnid>/
        ds, folders = image_folder(os.path.join(base, "val"), transform)
        if folders != wnids:
            raise UsageError(f"TinyImageNet: {base}/val has {len(folders)} class folders, wnids.txt lists {len(wnids)}")
    return ds, [words[w].split(",")[0].strip() for w in wnids], wnids  # first synonym


def image_folder_classes(path, transform):
    """An ImageFolder directory as a zero-shot set: (dataset, class names or None, WordNet ids or None): folders named
    by WordNet ids are named later (labelled)."""
    ds, folders = image_folder(path, transform)
    return (ds, None, folders) if all(map(is_wnid, folders)) else (ds, folders, None)


def labelled(name, ds, names, wnids, root, class_names_file, template):
    """The last step of every zero-shot set: WordNet ids named (--class-names, or ImageNet's devkit under `root`), the
    class names checked and refined for prompts. Returns (name, dataset, class names, template)."""
    if wnids is not None and (names is None or class_names_file is not None):
        try:
            names = wnid_names(name, wnids, root, class_names_file)
        except ImportError as e:  # parsing the devkit archive needs scipy
            raise UsageError(f"{name}: reading ImageNet's devkit needs the Python package '{e.name}' "
                             f"(pip install {e.name}), or give --class-names FILE")
    check_classes(name, names)
    return name, ds, [refine_class_name(n) for n in names], template


def validation_dataset(spec, root, resolution, class_names_file=None):
    """AdvFLYP's early-stopping set (advflyp.py --val-data): TinyImageNet under `root` (the paper's), or an ImageFolder
    directory. (name, dataset of (image in [0, 1], label), class names, template)."""
    templates, transform = read_data_list("templates.tsv"), image_transform(resolution)
    if spec == "TinyImageNet":
        if not os.path.isdir(os.path.join(root, "tiny-imagenet-200")):
            raise UsageError(f"--val-data TinyImageNet: not found, expected {os.path.join(root, 'tiny-imagenet-200')} "
                             "(wnids.txt, words.txt and val/); evaluate.py --datasets TinyImageNet --download "
                             "fetches it")
        return labelled("TinyImageNet", *tiny_imagenet(root, transform, False), root, class_names_file,
                        templates["TinyImageNet"])
    if not os.path.isdir(spec):
        raise UsageError(f"--val-data {spec}: neither TinyImageNet nor a directory of class folders")
    return labelled(os.path.basename(os.path.abspath(spec)), *image_folder_classes(spec, transform), root,
                    class_names_file, templates["folder"])


# evaluation loading: every sample exactly once across processes
class UnreadableImage(UsageError):
    """An evaluation image that cannot be read: a benchmark missing an image is not the benchmark, so evaluation
    stops and names it (replace the file and rerun the command: the evaluation continues where it stopped)."""


class Indexed(torch.utils.data.Dataset):
    """Wraps a dataset to also return each item's index (for per-sample random starts)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            image, label = self.dataset[i]
        except UNREADABLE_IMAGE_ERRORS as e:
            path = image_file(self.dataset, i)
            where = f": {path}" if path and path not in str(e) else ""
            raise UnreadableImage(f"image {i} cannot be read ({type(e).__name__}: {e}{where}); replace it with a "
                                  "readable copy and rerun the same command: the evaluation continues where it stopped")
        return image, label, i


def image_file(dataset, i):
    """The file of image i where the dataset keeps a list of its files (ImageFolder's and FileList's samples,
    torchvision's _image_files, ...), through Subsets; else None."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    for name in ("samples", "imgs", "_samples", "_image_files", "_images", "files"):
        files = getattr(dataset, name, None)
        if isinstance(files, (list, tuple)) and len(files) == len(dataset):
            entry = files[i][0] if isinstance(files[i], (list, tuple)) else files[i]
            return str(entry) if isinstance(entry, (str, os.PathLike)) else None
    return None


def eval_batches(loader):
    """Iterate an eval_loader; an unreadable image stops it with one line. (From a DataLoader worker the error comes
    back with the worker's traceback in its message: the last line is the original one.)"""
    try:
        yield from loader
    except UnreadableImage as e:
        last = str(e).strip().splitlines()[-1]
        raise UsageError(last.split("UnreadableImage: ", 1)[-1]) from None


def eval_loader(dataset, batch_size, dist, workers=0, indices=None):
    """This rank's share of `dataset`, or of its images `indices` (default: all), in batches: the list is cut into
    batches of `batch_size` and rank r takes batches r, r + W, r + 2W, ... Every sample is evaluated exactly once (no
    padding), and in the same batch whatever the number of processes, so per-sample results (down to the last bit of
    a float) do not depend on it. Items are (image, label, index in `dataset`)."""
    indices = list(range(len(dataset)) if indices is None else indices)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)][dist.rank::dist.world]
    return Loader(Indexed(dataset), batch_sampler=batches, num_workers=usable_workers(workers),
                  pin_memory=dist.device.type == "cuda", worker_init_fn=worker_ignores_signals)


# ---------------------------------------------------------------------------------------------------------------- PGD
def random_start(global_shape, eps, seed, step, rank, world, device):
    """PGD's uniform random start U(-ε, ε) for this rank's share of a global batch. Drawn for the whole global
    batch from a generator seeded by (seed, step), so it does not depend on the number of processes."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    delta = (torch.rand(global_shape, generator=g, device=device) * 2 - 1) * eps
    local = global_shape[0] // world
    return delta[rank * local:(rank + 1) * local]


def pgd(loss_fn, x, eps, alpha, steps, delta=None):
    """ℓ∞ PGD (docs/methods.md): maximise loss_fn(x_adv) (a scalar) over the ε-ball around x, inside [0, 1].

    x_0 = clamp(x + δ, 0, 1) with δ ~ U(-ε, ε) unless `delta` is given;
    x_{s+1} = clamp(x + clamp(x_s + α·sign(∇ loss(x_s)) − x, −ε, ε), 0, 1); the last iterate is returned.
    Only the input gradient is computed (input_grad), so parameters never accumulate .grad; callers put the model
    in eval mode. ε = 0 or no steps: no attack, x itself (clean fine-tuning), and no pass through the model."""
    x = x.detach()
    if eps == 0 or steps == 0:
        return x
    if delta is None:
        delta = torch.empty_like(x).uniform_(-eps, eps)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv + alpha * input_grad(loss_fn, x_adv).sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


# Streams of per-sample random draws (sample_generator): one per kind of draw, so that no two kinds share numbers.
STREAMS = {"start": 0, "target": 1, "diversity": 2, "square stripes": 3, "square": 4, "restart": 5}


def sample_generator(seed, index, stream, device="cpu"):
    """The generator of one sample's random draws of one kind (`stream`, STREAMS), seeded by (seed, the sample's
    dataset index, stream): the same whatever the batch or the number of processes. torch's generators keep only
    the low 32 bits of a seed, so the stream is mixed into them multiplicatively (a bijection of the index within a
    stream); stream 0 is seed · 1 000 003 + index."""
    base = seed * 1_000_003 + index
    value = base if stream == 0 else base * 0x9E3779B1 + stream * 0x7F4A7C15
    return torch.Generator(device=device).manual_seed(value & 0xFFFFFFFF)


def per_sample_start(index, shape, eps, seed, device, restart=0):
    """U(-ε, ε) noise for each sample from its own generator (sample_generator): independent of batching and of the
    number of processes; `restart` r > 0 draws another start for the same sample (an attack's r-th restart).
    index: (B,) -> (B, *shape)."""
    out = torch.empty((len(index), *shape), device=device)
    for j, i in enumerate(index.tolist()):
        g = sample_generator(seed, i, 0 if restart == 0 else STREAMS["restart"] + restart - 1, device)
        out[j] = (torch.rand(shape, generator=g, device=device) * 2 - 1) * eps
    return out


def cross_entropy_per_sample(logits, y):
    """CE(logits, y) = log(1 + Σ_{j≠y} exp(z_j − z_y)), (B, C), (B,) -> (B,), without the cancellation of
    logsumexp(z) − z_y: at CLIP's scale 100 a confident sample's CE is below float32's resolution around 1, and
    F.cross_entropy returns exactly 0 with a gradient whose true-class entry p_y − 1 is exactly 0. APGD uses it
    always (its best-point and checkpoint tests need the progress); the other attacks with evaluate.py --stable-ce."""
    rest = (logits - logits.gather(1, y[:, None])).scatter(1, y[:, None], float("-inf"))  # z_j − z_y, j ≠ y
    return F.softplus(torch.logsumexp(rest, dim=1))


# evaluate.py --stable-ce: the cross-entropy that PGD, the targeted PGDs and Table 6's attacks ascend, computed
# without cancellation (docs/attacks.md). Off: F.cross_entropy, as torchattacks and the papers' code compute it.
STABLE_CE = contextvars.ContextVar("stable_ce", default=False)


def attack_cross_entropy(logits, y):
    """Σ_i CE(z_i, y_i), (B, C), (B,) -> scalar: F.cross_entropy, or cross_entropy_per_sample under STABLE_CE.
    Summed, so that each sample's gradient does not depend on the batch size."""
    if STABLE_CE.get():
        return cross_entropy_per_sample(logits, y).sum()
    return F.cross_entropy(logits, y, reduction="sum")


def ce_attack_loss(logits_fn, y):
    """PGD's evaluation loss: Σ_i CE(logits_fn(x_adv)_i, y_i) (attack_cross_entropy)."""
    return lambda x_adv: attack_cross_entropy(logits_fn(x_adv), y)


def attack_pgd(logits_fn, x, y, index, eps, alpha, steps, seed):
    """Untargeted PGD on CE at CLIP's logit scale (docs/evaluation.md `pgd`)."""
    delta = per_sample_start(index, x.shape[1:], eps, seed, x.device)
    return pgd(ce_attack_loss(logits_fn, y), x, eps, alpha, steps, delta)


def zero_shot_accuracy(encoder, text_feats, dataset, dist, eps, alpha=1 / 255, steps=20, batch_size=256,
                       ctx=nullcontext(), seed=0, workers=0, desc=None):
    """Zero-shot clean and PGD accuracy (%) of `encoder` on `dataset` with class text features `text_feats` (C, D):
    {"n": images, "clean": %, "pgd": %}, every image counted once across processes. Logits are 100 · s(f(x), T); an
    image counts as robust only if it is classified correctly both clean and at x_adv, and only those are attacked
    (attack_pgd). The demo's tables and AdvFLYP's validation use it; evaluate.py runs the other attacks, keeps the
    per-image results and gives the same numbers for PGD (same batches, same per-image random starts)."""
    encoder.eval()
    logits_fn = lambda x: CLIP_LOGIT_SCALE * cosine_sim(encoder(x), text_feats)  # noqa: E731
    counts = torch.zeros(4, dtype=torch.float64, device=dist.device)  # images, correct clean, robust, failed
    error = None
    # A signal stops it at once (the demo's tables), except inside training (AdvFLYP's validation at an epoch's
    # end), where the run's deferred scope stands: the step saves first.
    with nullcontext() if SIGNALS.deferred else SIGNALS.interruptible(f"during the evaluation {desc or ''}".rstrip()):
        try:
            for x, y, index in progress(eval_batches(eval_loader(dataset, batch_size, dist, workers)), dist,
                                        desc=desc, leave=False):
                x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
                with ctx, torch.no_grad():
                    ok = logits_fn(x).argmax(-1) == y  # (B,)
                robust = torch.zeros_like(ok)
                if ok.any():
                    with ctx:
                        x_adv = attack_pgd(logits_fn, x[ok], y[ok], index[ok.cpu()], eps, alpha, steps, seed)
                    with ctx, torch.no_grad():
                        robust[ok] = logits_fn(x_adv).argmax(-1) == y[ok]
                counts[:3] += torch.stack([torch.tensor(len(y), device=dist.device), ok.sum(), robust.sum()]).double()
        except UsageError as e:  # an unreadable image: counted as a failure so that no rank waits below for this one
            error, counts[3] = e, 1
    n, clean, pgd_ok, failed = all_reduce_sum(counts, dist).tolist()
    if failed:
        raise error or UsageError("an image of the evaluation set cannot be read (another process names it)")
    return {"n": int(n), "clean": round(100.0 * clean / max(n, 1), 2), "pgd": round(100.0 * pgd_ok / max(n, 1), 2)}




# --------------------------------------------------------------------------------------------------- training harness
def warmup_steps(warmup, total):
    """--warmup in steps: a whole number is steps, a number in (0, 1) that share of the run's `total` steps (so that a
    short run, AdvFLYP's Figure 3 at 10,000 pairs, still reaches its peak learning rate)."""
    return round(warmup * total) if 0 < warmup < 1 else int(warmup)


def parse_warmup(text):
    """--warmup's type: steps (an integer ≥ 0) or a share of the run (a number in (0, 1))."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and (value < 1 or value == int(value))):
        raise argparse.ArgumentTypeError(f"{text}: give steps (an integer >= 0) or a share of the run in (0, 1)")
    return value if value < 1 else int(value)


def cosine_lr(step, base_lr, warmup, total):
    """Linear warm-up over `warmup` steps (or that share of `total`: warmup_steps), then cosine decay to 0 at
    `total`."""
    warmup = warmup_steps(warmup, total)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_steps(args, steps_per_epoch):
    """The run's length in optimizer steps: --epochs of the data, capped by --max-steps when given."""
    full = args.epochs * steps_per_epoch
    return full if args.max_steps is None else min(args.max_steps, full)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as the scripts show it: the docstring's line breaks kept, and every flag's default after its help
    (unless the help already says it, or the flag is off or unset by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: {action.default:g})" if isinstance(action.default, float) else \
            f"{text} (default: {action.default})"


def train_parser(doc, method, class_names=True, lr_default=None, **defaults):
    """The flags every training script shares; `defaults` are the method's paper settings. `optimizer` (default
    "SGD") names the method's optimizer in the help; only SGD has --momentum. class_names=False: the method reads no
    labels, so there is no --class-names. lr_default: the help's words for a default that --lr=None stands for
    (a method that derives it from another flag)."""
    optimizer = defaults.pop("optimizer", "SGD")
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--model", default="ViT-B/32", help="released CLIP name (downloaded once to ~/.cache/clip), "
                                                        "checkpoint file, random:ARCH or demo")
    p.add_argument("--vision-weights", default=None, metavar="FILE",
                   help="start from these image-encoder weights (e.g. a released robust model, docs/released-weights.md"
                        "), loaded into "
                        "--model's image encoder; the frozen original model is then this one")
    p.add_argument("--data", default="./data/imagenet", help=defaults.pop(
        "data_help", "ImageNet root (train/ + devkit), ImageFolder directory, 'synthetic' or 'demo'"))
    if class_names:
        p.add_argument("--class-names", default=None, help="file with one class name per line (sorted folder order)")
    else:
        p.set_defaults(class_names=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<timestamp>); reused = resume")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split across processes")
    p.add_argument("--lr", type=float, default=defaults.pop("lr"), help=f"peak learning rate ({optimizer})" + (
        f" (default: {lr_default})" if lr_default else ""))
    if optimizer == "SGD":
        p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help=f"{optimizer} weight decay")
    p.add_argument("--warmup", type=parse_warmup, default=1000,
                   help="linear warm-up before cosine decay: steps, or a share of the run's steps if below 1 (0.1)")
    p.add_argument("--eps", type=float, default=1.0, help="training ε, in units of 1/255 (ℓ∞)")
    alpha = "= eps" if defaults.get("alpha") is None else f"{defaults['alpha']:g}"
    p.add_argument("--alpha", type=float, default=None, help=f"PGD step size in units of 1/255 (default: {alpha})")
    p.add_argument("--attack-steps", type=int, default=2, help="PGD steps of the inner maximisation")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader worker processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, PGD random starts, random weights")
    p.add_argument("--save-every", type=int, default=500, help="write last.pt every this many steps (and each epoch)")
    p.add_argument("--log-every", type=int, default=10, help="log every this many steps")
    p.add_argument("--synthetic-size", type=int, default=10_000, help="number of images of --data synthetic")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="train on N samples of --data only: a fixed random choice (the same for every --seed), or "
                        "the first N with --subset-order first (data-amount ablations; docs/reproduce.md)")
    p.add_argument("--subset-per-class", type=int, default=None, metavar="N",
                   help="train on N samples of each class of --data only (e.g. 100: a 100k subset of ImageNet)")
    p.add_argument("--subset-order", choices=["random", "first"], default="random",
                   help="which samples --subset / --subset-per-class keep: a fixed random choice, or the first ones "
                        "in the data's own order (a caption index's first N records, as the AdvFLYP code takes them)")
    p.add_argument("--max-unreadable", type=float, default=0.01,
                   help="stop when more than this fraction of the training images is unreadable in an epoch "
                        "(fewer are replaced by the next readable image, counted and reported)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoders (off by default: it did not pay on a CPU; "
                        "docs/performance.md)")
    p.add_argument("--demo", action="store_true",
                   help="the built-in demo: tiny CLIP, procedural data, before/after zero-shot table (no download)")
    p.set_defaults(method=method, **defaults)
    return p


# Demo settings, the same for every method (one learning rate, so the demos compare): tiny model, 32x32 images,
# minutes on a CPU.
DEMO_DEFAULTS = dict(model="demo", data="demo", epochs=6, batch_size=64, warmup=20, eps=4.0, lr=1e-3, workers=0,
                     save_every=1000, log_every=10, weight_decay=0.0)


def parse_train_args(parser, argv=None, check_data=True, derive=None):
    """Parse, apply --demo defaults (flags given explicitly still win), derive values (derive(args): the method's
    own, e.g. its name or a default that depends on another flag; it may raise UsageError), validate (--data too,
    unless check_data=False: a script whose --data is not an image-folder dataset validates it itself)."""
    args = parser.parse_args(argv)
    if args.demo:  # parsed again with the demo's defaults, so that a flag given on the command line still wins
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if derive is not None:
        derive(args)
    if args.alpha is None:
        args.alpha = args.eps
    for name in ("eps", "alpha"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} {getattr(args, name)}: must be >= 0")
    for name in ("epochs", "batch_size", "save_every", "log_every", "synthetic_size", "subset", "subset_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.subset is not None and args.subset_per_class is not None:
        raise UsageError("--subset and --subset-per-class: choose one")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: must be >= 0")
    if args.attack_steps < 0:
        raise UsageError(f"--attack-steps {args.attack_steps}: must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps}: must be >= 1")
    if args.lr is None or args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if not 0 <= args.max_unreadable < 1:
        raise UsageError(f"--max-unreadable {args.max_unreadable}: must be a fraction in [0, 1)")
    if check_data and args.data not in ("synthetic", "demo") and not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: no such directory (an ImageNet root with train/ and the devkit, "
                         "an ImageFolder directory, 'synthetic' or 'demo')")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    check_parent_dirs(args.out, "--out")
    return args


def check_parent_dirs(path, flag):
    """A one-line error, before anything is written, if a folder above `path` is a file (makedirs would fail)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")


def hold_lock(path, what):
    """Take an exclusive lock on the file `path` (created if need be) for as long as the returned file object is open,
    i.e. while this run lives: a POSIX lock (fcntl), which the kernel drops when the process ends however it ends, so
    a job killed by the scheduler leaves nothing that blocks its requeued rerun (the file stays; it is not a marker).
    A second run finds it held and stops with one line naming the holder (`what` names the output it protects).
    Where the filesystem has no locks, says so once and returns None: runs are then not kept apart."""
    import fcntl
    import socket
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UsageError(f"{what}: {holder} is writing there now (it holds {path}); wait for it to end, or give "
                         "another --out")
    except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks on this filesystem
        f.close()
        print(f"warning: {path}: this filesystem has no file locks ({e.strerror}); two runs into the same --out "
              "would not be kept apart", file=sys.stderr, flush=True)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


@contextlib.contextmanager
def writing(path):
    """Turn a failure to write `path` (a full or read-only filesystem, a missing permission, a quota) into one line
    naming the path and the errno, instead of a traceback from inside the writer."""
    try:
        yield
    except OSError as e:
        reason = f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})" if e.strerror else str(e)
        raise UsageError(f"cannot write {path}: {reason}; what was saved before is kept") from None


class _RecordingFile:
    """A file object that keeps the OSError its write raised: torch.save reports a failed write as its own
    RuntimeError ('unexpected pos ...') without the errno."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, write, mode="wb"):
    """write(file) into a temporary file beside `path` (its folder made if need be; a name of its own, so writers
    on several processes or nodes never share one), fsync, rename: a crash never leaves a half-written file under
    `path`, and a full or read-only filesystem stops with one line (writing) and leaves `path` as it was."""
    import tempfile
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(path) or ".")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions open() would give (mkstemp's are 0600)
        try:
            with os.fdopen(fd, mode) as f:
                recording = _RecordingFile(f)
                try:
                    write(recording)
                except RuntimeError:
                    if recording.error is None:
                        raise
                    raise recording.error from None
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_save(obj, path):
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    """JSON to `path`, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


# Flags that may differ between a run and its resumed rerun: paths (the data's size and class names are checked
# instead), DataLoader workers, the logging and saving intervals, --compile, --demo (its values are compared one by
# one) and --max-unreadable. Every other flag fixes the trajectory and must be what last.pt was written with.
RESUME_MAY_CHANGE = {"out", "data", "class_names", "val_root", "workers", "log_every", "save_every", "compile", "demo",
                     "max_unreadable"}


# Flags added after runs were written with the scripts, and the value that stands for their absence from an older
# last.pt (the behaviour before the flag existed): such a run resumes under a command that leaves them at that value.
ADDED_FLAGS = {"subset": None, "subset_per_class": None, "subset_order": "random", "train": "image",
               "reg_terms": "both", "class_captions": False, "reg": "none", "tga_form": "official"}


def resume_mismatch(saved_args, args, saved_data, data):
    """Why last.pt (written with `saved_args`, on data `saved_data`) cannot be continued by this command, as a list
    of 'the flag: that run's value vs this one' (empty: it can). saved_data is None in checkpoints older than it."""
    show = lambda v: "(not set)" if v is None else str(v)  # noqa: E731
    now = vars(args)
    saved_args = {**{k: v for k, v in ADDED_FLAGS.items() if k in now}, **saved_args}  # older runs: the old behaviour
    diffs = [f"--{k.replace('_', '-')} {show(saved_args.get(k))} there, {show(now.get(k))} now"
             for k in sorted(set(saved_args) | set(now))
             if k not in RESUME_MAY_CHANGE and saved_args.get(k) != now.get(k)]
    for key, what in (("size", "images"), ("classes", "class names")):
        if saved_data is not None and saved_data.get(key) != data.get(key):
            diffs.append(f"--data {what} {show(saved_data.get(key))} there, {show(data.get(key))} now")
    return diffs


def log_step(line):
    """The step of a log.jsonl line, or None for a line that is not a JSON record (one cut short when a disk filled
    up or a node died mid-write: a rerun drops it and keeps the valid records)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


class Run:
    """A training run: its directory (args.json, log.jsonl, last.pt, model.pt (TorchScript), model_state_dict.pt
    (plain state dict, for open_clip), results.json) and everything that happens between two steps: logging,
    checkpoints, resume, preemption (SIGTERM/SIGUSR1), unreadable images and non-finite losses. Only rank 0 writes;
    every rank reads last.pt when resuming.

        run = Run(args, dist, len(dataset), class_names)   # refuses a last.pt written with other settings
        step = run.start(clip_model, optimizer, scaler, total_steps, steps_per_epoch)    # resumes, if it can
        ... after each update: run.step_done(step, loss, lr, unreadable)
    """

    def __init__(self, args, dist, dataset_size, class_names=None):
        self.args, self.dir, self.dist = args, args.out, dist
        self.ckpt_path = os.path.join(self.dir, "last.pt")
        classes = None if class_names is None else hashlib.sha1("\n".join(class_names).encode()).hexdigest()[:12]
        self.data = {"size": dataset_size, "classes": classes}
        self.lock, refused = None, None
        if dist.is_main:  # one run at a time in a run directory: a second one stops here, before it reads or writes
            try:
                with writing(self.dir):
                    os.makedirs(self.dir, exist_ok=True)
                    self.lock = hold_lock(os.path.join(self.dir, ".lock"), f"--out {self.dir}")
            except UsageError as e:
                refused = e
        raise_on_every_rank(refused, dist)  # every rank stops with rank 0, none waits for it in a collective
        self.checkpoint = self.load()  # the last.pt to resume from, or None
        if self.checkpoint is not None:
            saved = self.checkpoint.get("args", {})
            if saved.get("method") != args.method:
                raise UsageError(f"{self.ckpt_path}: is the checkpoint of a {saved.get('method')} run, this is "
                                 f"{args.method}; give a new --out to start afresh")
            diffs = resume_mismatch(saved, args, self.checkpoint.get("data"), self.data)
            if diffs:
                raise UsageError(f"{self.ckpt_path} was written with other settings: {'; '.join(diffs)}. Rerun with "
                                 "that run's settings to resume it, or give a new --out (or remove last.pt) to start "
                                 "afresh")
        if dist.is_main and self.checkpoint is None:
            write_json(vars(args), os.path.join(self.dir, "args.json"))
        if args.eps == 0 or args.attack_steps == 0:
            self.print(f"--eps {args.eps:g} --attack-steps {args.attack_steps}: clean fine-tuning, no adversarial "
                       "images (the attack's passes are skipped)")
        self.preemption = SIGNALS  # from start_timer() to write_model(), a signal stops the run after a step
        self.t_last, self.steps_since = time.time(), 0

    def print(self, *a):
        if self.dist.is_main:
            print(*a, flush=True)

    def log(self, record):
        """Append one JSON object to log.jsonl (rank 0)."""
        path = os.path.join(self.dir, "log.jsonl")
        if self.dist.is_main:
            with writing(path), open(path, "a") as f:  # a line cut short by a full disk is dropped on resume
                f.write(json.dumps(record) + "\n")

    def load(self):
        """The last.pt checkpoint (weights_only) or None."""
        if not os.path.exists(self.ckpt_path):
            return None
        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{self.ckpt_path}: unreadable checkpoint ({type(e).__name__}); move it away to restart")

    def start(self, clip_model, optimizer, scaler, total_steps, steps_per_epoch):
        """Restore model, optimizer, grad scaler and RNG state from last.pt (the inverse of save), if there is one,
        and drop the log records of the steps after it (they are replayed). Returns the step to continue from (0
        for a new run). Method state saved with step_done(extra=...) is in run.checkpoint."""
        self.model, self.optimizer, self.scaler = clip_model, optimizer, scaler
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        if warmup_steps(self.args.warmup, total_steps) >= total_steps:  # a short run at the paper's 1000 steps
            self.print(f"--warmup {self.args.warmup} is not below the run's {count(total_steps, 'step')}: the learning "
                       "rate rises for the whole run, never reaching --lr or decaying (give a shorter --warmup, or a "
                       "share of the run such as 0.1)")
        self.unreadable = 0  # unreadable images this rank met in the current epoch (rank 0: plus the saved count)
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.dist.device)  # step, on the device
        step = 0
        if self.checkpoint is not None:
            ckpt = self.checkpoint
            clip_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            step = ckpt["step"]
            self.unreadable = ckpt.get("unreadable", 0) if self.dist.is_main else 0
            log = os.path.join(self.dir, "log.jsonl")
            if self.dist.is_main and os.path.isfile(log):
                with open(log) as f:
                    kept = [line.rstrip("\n") + "\n" for line in f if log_step(line) is not None
                            and log_step(line) <= step]
                atomic_write(log, lambda f: f.writelines(kept), mode="w")
            self.print(f"resuming {self.dir} from step {step}/{total_steps}")
        self.saved_step = step if self.checkpoint is not None else None
        return step

    def step_done(self, step, loss, lr, unreadable, extra=None, epoch_end=None):
        """After the update that completed `step` (counted from 1): note this rank's loss and unreadable images
        (a (b,) tensor of 0/1 from SkipUnreadable); on the steps that log (every --log-every steps, each epoch's
        end, the run's end) or save (every --save-every steps, each epoch's end, the run's end, after a preemption
        signal), check the run's health (finite loss and weights, few unreadable images), log and checkpoint; after
        a signal, raise Preempted. `extra`: the method's own state to keep in last.pt; `epoch_end(step)`: called at
        the end of each epoch and of the run, after the health checks and before the checkpoint (AdvFLYP's early
        stopping validates there). No host-device synchronisation on the other steps."""
        args, dist = self.args, self.dist
        bad = ~torch.isfinite(loss.detach()) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(bad, torch.full_like(self.first_nonfinite, step), self.first_nonfinite)
        self.unreadable += int(unreadable.sum())  # a CPU tensor from the DataLoader: no device sync
        preempted = self.preemption.requested(dist)  # a small host-side all-reduce, every rank at every step
        last, at_epoch_end = step == self.total_steps, step % self.steps_per_epoch == 0
        logs = step % args.log_every == 0 or last or at_epoch_end
        saves = preempted or last or at_epoch_end or step % args.save_every == 0
        if not (logs or saves):
            return
        self.check_finite(step)
        unreadable_all = self.count_unreadable(step)
        if logs:
            loss_avg = all_reduce_sum(loss.detach().float().clone(), dist).item() / dist.world
            self.log({"step": step, "epoch": (step - 1) // self.steps_per_epoch, "loss": round(loss_avg, 6), "lr": lr,
                      "unreadable_images": unreadable_all, **self.throughput(step, args.batch_size, dist.device)})
        if at_epoch_end or last:
            if unreadable_all:
                self.print(f"epoch {(step - 1) // self.steps_per_epoch}: {unreadable_all} unreadable image(s), each "
                           "replaced by the next readable one")
            if at_epoch_end:
                self.unreadable = 0  # a new epoch starts
            if epoch_end is not None:
                epoch_end(step)
        if saves:
            self.save(step, {"unreadable": 0 if at_epoch_end else unreadable_all, **(extra or {})})
        if preempted:
            signal_name = self.preemption.received or "signal to another process"
            what = "interrupted" if self.preemption.status == INTERRUPTED else "preempted"
            self.log({"step": step, "preempted": signal_name})
            raise Preempted(f"{what} ({signal_name}) after step {step}/{self.total_steps}: saved {self.ckpt_path}; "
                            f"rerun the same command to resume (exit status {self.preemption.status})",
                            self.preemption.status)

    def check_finite(self, step):
        """Stop (one line, on every rank) if any rank's loss was not finite at a step since the start, or if the
        weights are not: last.pt is never overwritten with them."""
        first = torch.where(self.first_nonfinite < 0, torch.full_like(self.first_nonfinite, 1 << 62),
                            self.first_nonfinite).clone()
        if self.dist.world > 1:
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        weights_ok = all(bool(torch.isfinite(p).all()) for p in self.model.visual.parameters())
        if first.item() < (1 << 62) or not weights_ok:
            what = f"step {first.item()}: the loss is not finite" if first.item() < (1 << 62) else \
                f"step {step}: the weights are not finite"
            raise UsageError(f"{what} (too high a --lr? fp16 overflow? try --amp bf16 or off); stopped without "
                             f"saving: {self.last_checkpoint()}")

    def count_unreadable(self, step):
        """Unreadable images of all ranks in this epoch so far; more than --max-unreadable of the dataset stops."""
        total = torch.tensor([self.unreadable], dtype=torch.long)
        if self.dist.world > 1:
            torch_dist.all_reduce(total, group=self.dist.cpu_group)
        total = int(total.item())
        limit = self.args.max_unreadable * self.data["size"]
        if total > limit:
            raise UsageError(f"--data {self.args.data}: {total} unreadable images in epoch "
                             f"{(step - 1) // self.steps_per_epoch} so far, more than --max-unreadable "
                             f"{self.args.max_unreadable:g} of its {self.data['size']} images: is the dataset complete "
                             f"and readable? Stopped: {self.last_checkpoint()}")
        return total

    def last_checkpoint(self):
        return (f"the last checkpoint is {self.ckpt_path} (step {self.saved_step})" if self.saved_step is not None
                else "no checkpoint was written yet")

    def start_timer(self, step):
        """Start timing at `step`, right before the first training step (setup and resume excluded). From here to
        write_model, a signal waits for the end of the step in hand (step_done saves, then stops the run)."""
        self.t_last, self.steps_since = time.time(), step
        self.preemption.defer()

    def throughput(self, step, global_batch, device):
        """images/s and s/step since the last call, and peak memory (MiB) of this process."""
        now = time.time()
        dt, n = now - self.t_last, max(1, step - self.steps_since)
        self.t_last, self.steps_since = now, step
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return {"img_per_s": round(n * global_batch / dt, 2), "s_per_step": round(dt / n, 4),
                "peak_mem_mib": round(peak)}

    def save(self, step, extra):
        """Write last.pt (checkpoint_state) at `step`, atomically, on rank 0."""
        if self.dist.is_main:
            atomic_save(checkpoint_state(self.model, self.optimizer, self.scaler, step, self.total_steps, self.args,
                                         self.data, **extra), self.ckpt_path)
        self.saved_step = step

    def write_model(self, clip_model):
        """model.pt (TorchScript, for clip.load) and model_state_dict.pt: the same weights as a plain fp32 state dict
        under OpenAI's key names, which open_clip (create_model_and_transforms(NAME-quickgelu, pretrained=PATH))
        and so CLIP_benchmark read. Both written atomically, by rank 0."""
        if self.dist.is_main:
            save_torchscript(clip_model, os.path.join(self.dir, "model.pt"))
            state_dict = {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone()  # own storage each
                          for k, v in clip_model.state_dict().items()}
            atomic_save(state_dict, os.path.join(self.dir, "model_state_dict.pt"))
        self.preemption.defer(False)  # a signal from here on (the demo's evaluation, results) stops at once
        self.preemption.check(f"after training: {os.path.join(self.dir, 'model.pt')} is written")

    def write_results(self, results):
        if self.dist.is_main:
            write_json(results, os.path.join(self.dir, "results.json"))


def checkpoint_state(clip_model, optimizer, scaler, step, total_steps, args, data=None, **extra):
    """last.pt: everything needed to resume exactly, and to refuse a rerun with other settings (args, and the data's
    size and class names); only tensors, numbers, strings, lists and dicts (weights_only). The RNG state is the CPU
    generator's alone: training draws its randomness from generators seeded by (seed, step) and (seed, epoch), so
    nothing device-specific is kept (a run resumes on a machine with fewer or no GPUs). `extra`: method state."""
    return {"model": clip_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "rng": {"torch": torch.get_rng_state()},
            "scheduler": {"kind": "cosine", "warmup": args.warmup, "total": total_steps, "base_lr": args.lr},
            "args": vars(args), "data": data, **extra}


def progress(iterable, dist, **kw):
    """tqdm on rank 0 (when attached to a terminal), the bare iterable elsewhere."""
    if not dist.is_main or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------------------------------------------- demo
# A task that needs no download: coloured shapes on textured backgrounds, 32x32 pixels. A concept is a colour and a
# shape ("a red ring"). A tiny CLIP is pretrained contrastively on captions of all 64 concepts; fine-tuning sees the
# 48 "proxy" concepts, and zero-shot evaluation uses the other 16, held out, with their own class prompts.
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


# The demo CLIP is pretrained with this many torch threads whatever the machine has (and whatever a caller set), so
# that every machine of a kind pretrains the same model: CPU float results depend on how many threads split a sum.
DEMO_PRETRAIN_THREADS = 2


DEMO_PRETRAIN_STEPS = 800


def demo_clip(steps=None, log=print):
    """The demo's tiny CLIP (ARCHITECTURES['tiny']), pretrained contrastively on captioned demo images of all 64
    concepts. Deterministic; cached in $CLIP_AFT_CACHE (default ~/.cache/clip-aft) after the first call."""
    steps = steps or DEMO_PRETRAIN_STEPS
    path = demo_cache_path()
    if os.path.isfile(path):
        return clip_from_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    log(f"pretraining the demo CLIP ({steps} steps, about a minute on 2 cores, once; cached in {path}) ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_PRETRAIN_THREADS)  # how a float sum is split changes the model: the same everywhere
    try:
        with SIGNALS.interruptible("while pretraining the demo CLIP, before anything was cached"):
            model = _pretrain_demo_clip(steps, log)
    finally:
        torch.set_num_threads(threads)
    atomic_save({"model": model.state_dict(), "steps": steps}, path)
    return model


def _pretrain_demo_clip(steps, log):
    """demo_clip's contrastive pretraining (CLIP's InfoNCE on the demo's captioned images)."""
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
        if (step + 1) % 100 == 0:
            log(f"  step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    return model.eval()


def demo_evaluate(encoder, clip_model, dist, ctx, args, run, when):
    """Zero-shot clean and PGD-20 (α = 1/255, ε = --eps) accuracy on the demo's held-out and proxy concepts."""
    out = {}
    for name, concepts in (("held_out", DEMO_HELD_OUT), ("proxy", DEMO_PROXY)):
        # test images, unseen in training
        ds = DemoImages(concepts, 512 // len(concepts), clip_model.visual.input_resolution, seed=2)
        text = text_features(clip_model, prompts_for(ds.classes), dist.device)
        out[name] = zero_shot_accuracy(encoder, text, ds, dist, args.eps / 255, 1 / 255, 20, ctx=ctx,
                                       seed=args.seed, desc=f"{when}: {name}")
    run.print(f"{when}: held-out {out['held_out']}  proxy {out['proxy']}")
    return out


def demo_report(run, args, before, after):
    """Print the demo's before/after table and write results.json."""
    rows = [("before (original CLIP)", before), (f"after ({METHOD_NAMES[args.method]})", after)]
    run.print(f"\nZero-shot accuracy (%), ε = {args.eps:g}/255, PGD-20:")
    run.print(f"{'':24s} {'held-out clean':>15s} {'held-out PGD':>13s} {'proxy clean':>12s} {'proxy PGD':>10s}")
    for label, r in rows:
        run.print(f"{label:24s} {r['held_out']['clean']:15.2f} {r['held_out']['pgd']:13.2f} "
                  f"{r['proxy']['clean']:12.2f} {r['proxy']['pgd']:10.2f}")
    threads = torch.get_num_threads()
    run.print(f"(CPU float results depend on the thread count and the CPU: {threads} torch thread(s) here; the "
              "spread measured across thread counts and machines, and what is stable: docs/demo.md)")
    run.write_results({
        "before": before["held_out"], "after": after["held_out"],
        "proxy": {"before": before["proxy"], "after": after["proxy"]},
        "eps": args.eps, "method": args.method, "torch_threads": threads,
        "held_out_concepts": [f"{c} {s}" for c, s in DEMO_HELD_OUT],
        "proxy_concepts": [f"{c} {s}" for c, s in DEMO_PROXY],
    })
    if run.dist.is_main:
        run.print(draw_demo_figure(os.path.join(run.dir, "results.json"), os.path.join(run.dir, "demo.png")))


def draw_demo_figure(results, out):
    """The demo's picture of its table, drawn by `figures.py demo` in a process of its own: figures.py is the one
    file that imports matplotlib, and common.py imports no other file of the project. Returns the line to print."""
    figures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures.py")
    r = subprocess.run([sys.executable, figures, "demo", results, "--out", out], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return f"figure: not drawn ({why}); draw it with: python figures.py demo {results} --out {out}"
    return f"figure: {out}"
