"""What only a GPU can check, skipped without CUDA; on one GPU the whole file takes a few minutes:

- one short run of every training script under bf16 and under fp16 autocast on random:ViT-B/32, finite losses;
- the fp16 attack-gradient guard on real fp16 kernels: without it confident images get an all-zero input gradient;
- evaluate.py with PGD and AutoAttack under bf16 and fp16;
- --compile (inductor on CUDA) trains and gives the eager run's losses;
- the benchmark commands of docs/performance.md at batch 256, bf16: img/s, s/step and peak memory per method, written
  to $CLIP_AFT_BENCH (default runs/cuda-bench.json);
- benchmarks/attack_speed.py (ours against torchattacks) in fp32 and bf16, and evaluate.py --defense, on the GPU.

Run it alone: `python -m pytest -q tests/test_cuda.py`."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import run_script

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# id: (script, its flags)
SCRIPTS = {"agft": ("agft.py", []), "tecoa": ("tecoa.py", []), "pmg-aft": ("tecoa.py", ["--pmg"]),
           "tga-zsr": ("tecoa.py", ["--tga"]), "advflyp": ("advflyp.py", []), "fare": ("fare.py", []),
           "advflyp-train-all": ("advflyp.py", ["--train", "all"])}  # the text encoder and logit_scale under AMP
CUDA_ENV = {"OMP_NUM_THREADS": "4"}  # the scripts' DataLoader and host work; the GPU does the rest


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_trains_under_amp(name, amp, tmp_path):
    script, flags = SCRIPTS[name]
    out = str(tmp_path / "run")
    r = run_script([script, *flags, "--model", "random:ViT-B/32", "--data", "synthetic", "--synthetic-size", "64",
                    "--batch-size", "32", "--max-steps", "2", "--log-every", "1", "--workers", "2", "--amp", amp,
                    "--out", out], env=CUDA_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"amp {amp}" in r.stdout and "cuda" in r.stdout
    logged = records(out)
    assert [rec["step"] for rec in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in logged)
    assert all(rec["peak_mem_mib"] > 0 for rec in logged)  # torch.cuda.max_memory_allocated


def test_fp16_attack_gradients_do_not_underflow_on_the_gpu():
    """The demo CLIP on CUDA under fp16 autocast: the plain input gradient of confidently classified images
    underflows to exactly 0; input_grad's per-sample scaling recovers the fp32 gradient's signs."""
    device = torch.device("cuda")
    model = common.load_clip("demo").to(device)
    encoder = common.ImageEncoder(model.visual).to(device).eval()
    ds = common.DemoImages(common.DEMO_HELD_OUT, 2, 32, seed=2)
    x = torch.stack([ds[i][0] for i in range(32)]).to(device)
    y = torch.tensor([ds[i][1] for i in range(32)], device=device)
    text = common.text_features(model, common.prompts_for(ds.classes), device)
    loss_fn = lambda xa: F.cross_entropy(100 * common.cosine_sim(encoder(xa), text), y, reduction="sum")  # noqa: E731
    reference = common.input_grad(loss_fn, x)  # fp32
    with torch.autocast("cuda", dtype=torch.float16):
        plain_x = x.clone().requires_grad_(True)
        plain, = torch.autograd.grad(loss_fn(plain_x), plain_x)
        scaled = common.input_grad(loss_fn, x)
    zero = lambda g: int((g.flatten(1).abs().amax(1) == 0).sum())  # noqa: E731
    assert zero(reference) == 0 and zero(plain) > 0, "the unscaled fp16 gradient should underflow"
    assert zero(scaled) == 0
    assert (scaled.sign() == reference.sign()).float().flatten(1).mean(1).min() > 0.97


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_evaluate_with_pgd_and_autoattack(amp, tmp_path):
    out = tmp_path / "r.json"
    r = run_script(["evaluate.py", "--model", "demo", "--datasets", "demo", "--attacks", "pgd,aa", "--eps", "4",
                    "--amp", amp, "--out", str(out)], env=CUDA_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    demo = json.loads(out.read_text())["datasets"]["demo"]
    assert demo["clean"] > 80 and 0 <= demo["aa"] <= demo["clean"] and 0 <= demo["pgd"] <= demo["clean"]


def test_compile_trains_like_eager(tmp_path):
    args = ["agft.py", "--model", "random:ViT-B/32", "--data", "synthetic", "--synthetic-size", "64", "--batch-size",
            "32", "--max-steps", "2", "--log-every", "1", "--workers", "2", "--amp", "off"]
    losses = []
    for extra in ([], ["--compile"]):
        out = str(tmp_path / f"run{len(extra)}")
        r = run_script([*args, *extra, "--out", out], env=CUDA_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append([rec["loss"] for rec in records(out)])
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=1e-4)


def test_benchmarks_at_batch_256_bf16(tmp_path):
    """docs/performance.md's benchmark commands on random:ViT-B/32 at global batch 256 (FARE: its default 128 and
    PGD-10), bf16: the last logged record of 12 steps (the first ones hold the warm-up)."""
    results = {}
    for name, (script, flags) in SCRIPTS.items():
        out = str(tmp_path / name)
        r = run_script([script, *flags, "--model", "random:ViT-B/32", "--data", "synthetic", "--max-steps", "12",
                        "--log-every", "4", "--workers", "4", "--amp", "bf16", "--out", out], env=CUDA_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        last = records(out)[-1]
        results[name] = {k: last[k] for k in ("img_per_s", "s_per_step", "peak_mem_mib")}
    results["device"] = torch.cuda.get_device_name(0)
    path = os.environ.get("CLIP_AFT_BENCH", os.path.join("runs", "cuda-bench.json"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    assert all(results[name]["img_per_s"] > 0 for name in SCRIPTS)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_attack_speed_against_torchattacks(amp, tmp_path):
    """benchmarks/attack_speed.py on the GPU (docs/performance.md's GPU rows): the demo CLIP, 512 images, batch 256, 20
    iterations, ours against torchattacks under the same autocast (off or bf16); the rows go to $CLIP_AFT_BENCH with
    -attacks-<amp> before .json."""
    base = os.environ.get("CLIP_AFT_BENCH", os.path.join("runs", "cuda-bench.json"))
    path = base.replace(".json", f"-attacks-{amp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    r = run_script(["benchmarks/attack_speed.py", "--model", "demo", "--images", "512", "--batch-size", "256",
                    "--steps", "20", "--seeds", "1", "--amp", amp, "--no-early-exit-too", "--json", path],
                   env=CUDA_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    rows = json.load(open(path))["rows"]
    assert all(row["img_per_s"] > 0 for row in rows)


def test_defended_evaluation_on_the_gpu(tmp_path):
    """evaluate.py --defense ttc and clipure-cos (every mode) on the GPU, bf16: runs, the large-ε check at 0."""
    for defense in ("ttc", "clipure-cos"):
        out = tmp_path / f"{defense}.json"
        r = run_script(["evaluate.py", "--model", "demo", "--datasets", "demo", "--attacks", "pgd", "--eps", "4",
                        "--amp", "bf16", "--defense", defense, "--eot", "2", "--square-queries", "50",
                        "--sanity-eps", "32", "--out", str(out)], env=CUDA_ENV)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(out.read_text())["datasets"]["demo"]["sanity"] < 5
