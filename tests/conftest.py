"""Shared fixtures: a tiny random CLIP checkpoint, the demo CLIP cache, and helpers to run the scripts."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

# The demo CLIP is pretrained once per test session (about a minute) unless CLIP_AFT_CACHE points at a cache.
if not os.environ.get("CLIP_AFT_CACHE"):
    os.environ["CLIP_AFT_CACHE"] = os.path.join(ROOT, ".pytest_cache", "clip-aft")
# Thread counts. With OMP_NUM_THREADS set, every computation in the tests and every script they start uses that many
# threads (other counts split float sums differently: the nearest this machine comes to another CPU; the suite must
# pass at any). Without it: 2 in this process, 1 in the scripts and in the modules that ask for `one_thread`.
THREADS = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None
SCRIPT_THREADS = {"OMP_NUM_THREADS": str(THREADS or 1)}  # the environment the tests start scripts with
torch.set_num_threads(THREADS or 2)


def tiny_clip(seed=0):
    """A random clip.model.CLIP of the tiny architecture (32x32 images, 8x8 patches)."""
    torch.manual_seed(seed)
    return common.CLIP(*common.ARCHITECTURES["tiny"]).float().eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (OMP_NUM_THREADS if set): the tiny model is fastest on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny random CLIP saved as a plain state dict checkpoint."""
    path = str(tmp_path_factory.mktemp("model") / "tiny.pt")
    torch.save({"model": tiny_clip().state_dict()}, path)
    return path


def run_script(args, nproc=1, timeout=600, env=None):
    """Run `python SCRIPT ARGS` (nproc=1) or `torchrun --standalone --nproc_per_node=N SCRIPT ARGS` (gloo on CPU)
    from the repository root; returns the CompletedProcess."""
    if nproc == 1:
        cmd = [sys.executable] + list(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + list(args)
    full_env = {**os.environ, **SCRIPT_THREADS, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def run_and_kill(args, ready, timeout=120):
    """Start `python ARGS` in its own process group, wait until ready() is true (or the run ends, or `timeout` s pass),
    then SIGKILL the group; returns the exit code (-SIGKILL if it was killed while running)."""
    env = {**os.environ, **SCRIPT_THREADS}
    proc = subprocess.Popen([sys.executable] + list(args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def load_weights(path):
    """The CLIP state dict of a run's last.pt or model.pt, read the way the project reads checkpoints."""
    return common.read_checkpoint_weights(path)


def run_main_in_process(main, argv, capsys):
    """A script's main(argv) through common.run_main, as `python SCRIPT ARGV` runs it: (exit code, stdout, stderr)."""
    code = 0
    try:
        common.run_main(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_images(folder, names, size=(40, 48), seed=0):
    """Small random RGB images at folder/name (format from the extension)."""
    rng = np.random.default_rng(seed)
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    """advflyp.py's kind of data: 8 captioned PNGs in a CSV with relative paths, one of them unreadable."""
    root = tmp_path_factory.mktemp("csvdata")
    write_images(root, [f"imgs/{i}.png" for i in range(8)])
    (root / "imgs" / "5.png").write_bytes(b"broken")
    (root / "pairs.csv").write_text("filepath,title\n" + "".join(f"imgs/{i}.png,a photo of thing {i}\n"
                                                                 for i in range(8)))
    return str(root / "pairs.csv")


def demo_zero_shot(per_class):
    """The demo CLIP (pretrained, cached) as zero_shot_eval sees it, on its held-out test images (per_class of each of
    the 16 concepts): (encoder, text features (16, D), dataset, logits_fn)."""
    model = common.load_clip("demo").requires_grad_(False)
    ds = common.DemoImages(common.DEMO_HELD_OUT, per_class, 32, seed=2)
    encoder = common.ImageEncoder(model.visual).eval()
    text = common.text_features(model, common.prompts_for(ds.classes), torch.device("cpu"))
    logits_fn = lambda x: common.CLIP_LOGIT_SCALE * common.cosine_sim(encoder(x), text)  # noqa: E731
    return encoder, text, ds, logits_fn


def run_demo_reduced(main, argv, out, monkeypatch, figure=False):
    """A script's demo in this process, shortened for the tests: its --max-steps from argv and every 32nd of the demo's
    test images in the before/after evaluation (the full demo's numbers: docs/demo.md), and its picture drawn only
    with figure=True (figures.py in a process of its own: seconds). Returns results.json."""
    accuracy = common.zero_shot_accuracy
    monkeypatch.setattr(common, "zero_shot_accuracy", lambda encoder, text, ds, *a, **k: accuracy(
        encoder, text, torch.utils.data.Subset(ds, range(0, len(ds), 32)), *a, **k))
    if not figure:
        monkeypatch.setattr(common, "draw_demo_figure", lambda results, out: f"figure: (not drawn) {out}")
    main(["--demo", *argv, "--out", str(out)])
    with open(os.path.join(str(out), "results.json")) as f:
        return json.load(f)


def zero_shot_eval(encoder, text_feats, dataset, dist, attacks=("pgd",), eps=1 / 255, alpha=1 / 255, steps=None,
                   batch_size=256, ctx=contextlib.nullcontext(), seed=0, workers=0, desc=None, timing=None,
                   attack_all=False):
    """Zero-shot clean and robust accuracy (%) of `encoder` on `dataset`, evaluate.zero_shot_samples counted, for the
    tests (the scripts' one such function is common.zero_shot_accuracy, clean and PGD): returns
    {"n": int, "clean": %, attack: % or None, ...}, None for an attack that needs more classes than there are
    (ATTACK_MIN_CLASSES). Counts are summed across processes; every sample is counted once."""
    from evaluate import ATTACK_MIN_CLASSES, zero_shot_samples
    columns = ["clean", *attacks]
    correct = torch.zeros(len(columns), dtype=torch.float64)
    n = torch.zeros(1, dtype=torch.float64)
    for index, out in zero_shot_samples(encoder, text_feats, dataset, dist, attacks, eps, alpha, steps, batch_size,
                                        ctx, seed, workers, desc, timing, attack_all):
        if out.get("stopped"):
            raise common.SIGNALS.stop("during the evaluation")
        if "error" in out:
            raise common.UsageError(out["error"])
        n += len(index)
        correct += torch.tensor([float(out[c].sum()) if c in out else 0.0 for c in columns], dtype=torch.float64)
    both = common.all_reduce_sum(torch.cat([n, correct]).to(dist.device), dist).cpu()
    n, acc = int(both[0].item()), (100.0 * both[1:] / max(int(both[0].item()), 1)).tolist()
    applicable = [len(text_feats) >= ATTACK_MIN_CLASSES.get(name, 2) for name in attacks]
    return {"n": n, "clean": round(acc[0], 2),
            **{name: round(a, 2) if ok_ else None for name, a, ok_ in zip(attacks, acc[1:], applicable)}}
