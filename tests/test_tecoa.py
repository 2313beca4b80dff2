"""tecoa.py (TeCoA and PMG-AFT): the losses against independent computations, the script end to end (1 and 2
processes, resume after kill -9, the demo, model.pt of all three methods, one-line errors)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPT_THREADS, kill_then_resume, load_weights, run_demo_reduced, run_script

import clip  # noqa: E402
import common  # noqa: E402
import advflyp  # noqa: E402
import tecoa  # noqa: E402


# --------------------------------------------------------------------------------------------------------- losses
def sims(seed, b=5, c=4):
    """Cosine similarities in [0.15, 0.35] as CLIP's are, float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    return (0.15 + 0.2 * torch.rand(b, c, generator=g, dtype=torch.float64)).requires_grad_(True)


LABELS = torch.tensor([0, 3, 1, 1, 2])


def close(a, b):
    """fp32 result a against float64 reference b: relative to the largest entry (logits reach 100)."""
    return torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def reference_ce(s, y, scale=100.0):
    """−log p_y with p the softmax of scale · s, from probabilities."""
    p = torch.exp(scale * s) / torch.exp(scale * s).sum(-1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def reference_kl(p, q):
    return (p * (p / q).log()).sum(-1).mean()  # KL(p ‖ q), mean over the batch


def reference_pmg(adv, orig, clean, y, scale=100.0):
    softmax = lambda s: torch.softmax(scale * s, dim=-1)  # noqa: E731
    return reference_ce(adv, y, scale) + reference_kl(softmax(orig), softmax(adv)) \
        + reference_kl(softmax(clean), softmax(adv))


def test_tecoa_loss_matches_cross_entropy_value_and_gradient():
    s = sims(0)
    for scale in (100.0, 7.0):
        loss = tecoa.tecoa_loss(s, LABELS, scale)
        assert torch.allclose(loss.double(), reference_ce(s, LABELS, scale), rtol=1e-5)
        g, = torch.autograd.grad(loss, s)
        g_ref, = torch.autograd.grad(reference_ce(s, LABELS, scale), s)
        assert close(g, g_ref)
    # the default is CLIP's scale 100
    assert torch.allclose(tecoa.tecoa_loss(s, LABELS), tecoa.tecoa_loss(s, LABELS, 100.0))
    assert not torch.allclose(tecoa.tecoa_loss(s, LABELS), tecoa.tecoa_loss(s, LABELS, 1.0))


def test_pmg_loss_matches_independent_value_and_gradient():
    adv, orig, clean = sims(1), sims(2), sims(3)
    for scale in (100.0, 3.0):
        loss = tecoa.pmg_loss(adv, orig, clean, LABELS, scale)
        assert torch.allclose(loss.double(), reference_pmg(adv, orig, clean, LABELS, scale), rtol=1e-4)
        mine = torch.autograd.grad(tecoa.pmg_loss(adv, orig, clean, LABELS, scale), [adv, clean])
        ref = torch.autograd.grad(reference_pmg(adv, orig, clean, LABELS, scale), [adv, clean])
        for a, b in zip(mine, ref):
            assert close(a, b)
    # direction: KL(p_orig ‖ p_adv) + KL(p_clean ‖ p_adv) (docs/methods.md), not the reverse
    softmax = lambda s: torch.softmax(100.0 * s, dim=-1)  # noqa: E731
    reverse = reference_ce(adv, LABELS) + reference_kl(softmax(adv), softmax(orig)) \
        + reference_kl(softmax(adv), softmax(clean))
    assert not torch.allclose(tecoa.pmg_loss(adv, orig, clean, LABELS).double(), reverse, rtol=1e-2)


def test_pmg_kl_terms_nonnegative_zero_when_matching_and_gradient_flow():
    for seed in range(5):
        adv, orig, clean = sims(10 + seed), sims(20 + seed), sims(30 + seed)
        extra = tecoa.pmg_loss(adv, orig, clean, LABELS) - tecoa.tecoa_loss(adv, LABELS)
        assert extra.item() >= -1e-6
    adv = sims(4)
    same = tecoa.pmg_loss(adv, adv.detach(), adv.detach(), LABELS)
    assert torch.allclose(same, tecoa.tecoa_loss(adv, LABELS), atol=1e-6)
    orig, clean = sims(5), sims(6)
    g_orig, g_clean = torch.autograd.grad(tecoa.pmg_loss(adv, orig, clean, LABELS), [orig, clean],
                                          allow_unused=True)
    assert g_orig is None or g_orig.abs().max() == 0  # the original model is a constant
    assert g_clean.abs().max() > 0  # the clean branch is not detached


def test_pmg_flag_names_the_method():
    assert tecoa.parse_args(["--data", "demo"]).method == "tecoa"
    args = tecoa.parse_args(["--demo", "--pmg"])
    assert args.method == "pmg-aft" and args.out.startswith(os.path.join("runs", "pmg-aft-"))
    assert (args.lr, args.model) == (1e-3, "demo")
    defaults = tecoa.parse_args(["--data", "synthetic"])
    assert (defaults.lr, defaults.batch_size, defaults.epochs, defaults.eps, defaults.alpha, defaults.warmup,
            defaults.momentum, defaults.attack_steps) == (1e-5, 256, 10, 1.0, 1.0, 1000, 0.9, 2)


# ------------------------------------------------------------------------------------------------ end to end
def train_args(script, tiny_ckpt, out, *extra):
    return [script, "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "24", "--out", out,
            "--batch-size", "4", "--epochs", "2", "--lr", "0.05", "--warmup", "1", "--eps", "4", "--workers", "0",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory):
    """TeCoA and PMG-AFT with one process (run concurrently: mostly start-up time)."""
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, **SCRIPT_THREADS}
    procs = {name: subprocess.Popen([sys.executable] + train_args("tecoa.py", tiny_ckpt, str(root / name), *flags),
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, flags in (("tecoa", []), ("pmg", ["--pmg"]))}
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    return {name: str(root / name) for name in procs}


def test_one_process_runs(runs, tiny_ckpt):
    start = load_weights(tiny_ckpt)
    finals = {}
    for name, method in (("tecoa", "tecoa"), ("pmg", "pmg-aft")):
        out = runs[name]
        assert json.load(open(os.path.join(out, "args.json")))["method"] == method
        records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert [r["step"] for r in records] == list(range(1, 13)) and all(np.isfinite(r["loss"]) for r in records)
        finals[name] = load_weights(os.path.join(out, "last.pt"))
        assert max((finals[name][k] - start[k]).abs().max().item() for k in start if k.startswith("visual.")) > 1e-3
        assert all(torch.equal(finals[name][k], start[k]) for k in start if not k.startswith("visual."))
    assert not all(torch.allclose(finals["tecoa"][k], finals["pmg"][k]) for k in start)  # the KL terms act


def test_pmg_two_processes_match_one(runs, tiny_ckpt, tmp_path):
    """DDP with two forward passes of f_θ per step (adversarial and clean) follows the one-process run."""
    r = run_script(train_args("tecoa.py", tiny_ckpt, str(tmp_path / "two"), "--pmg"), nproc=2)
    assert r.returncode == 0, r.stderr
    one, two = load_weights(os.path.join(runs["pmg"], "last.pt")), load_weights(str(tmp_path / "two" / "last.pt"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 2e-5


def test_resume_after_kill_matches_an_uninterrupted_run(runs, tiny_ckpt, tmp_path):
    out = str(tmp_path / "resumed")
    args = train_args("tecoa.py", tiny_ckpt, out, "--pmg", "--save-every", "1")
    ckpt = os.path.join(out, "last.pt")
    kill_then_resume(args, ckpt, 12)
    a, b = load_weights(os.path.join(runs["pmg"], "last.pt")), load_weights(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_model_pt_of_the_three_methods_loads(runs, tiny_ckpt, tmp_path):
    agft_out, advflyp_out = str(tmp_path / "agft"), str(tmp_path / "advflyp")
    env = {**os.environ, **SCRIPT_THREADS}
    procs = [subprocess.Popen([sys.executable] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for args in (train_args("agft.py", tiny_ckpt, agft_out, "--max-steps", "2"),
                          train_args("advflyp.py", tiny_ckpt, advflyp_out, "--max-steps", "2"))]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    image = torch.rand(2, 3, 32, 32)
    for out in (runs["tecoa"], runs["pmg"], agft_out, advflyp_out):
        path = os.path.join(out, "model.pt")
        trained = load_weights(os.path.join(out, "last.pt"))
        mine = common.load_clip(path)
        assert all(torch.equal(mine.state_dict()[k], trained[k]) for k in trained), out
        model, _ = clip.load(path, device="cpu", jit=False)  # OpenAI's loader (weights rounded to fp16 and back)
        with torch.no_grad():
            assert torch.allclose(model.float().encode_image(image), mine.encode_image(image), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("script,flags,method,label", [("tecoa", ["--pmg"], "pmg-aft", "PMG-AFT"),
                                                     ("advflyp", [], "advflyp", "ADVFLYP")])
def test_demos_reduced_pmg_and_advflyp(script, flags, method, label, tmp_path, capsys, monkeypatch):
    """`tecoa.py --demo --pmg` and `advflyp.py --demo` with 2 training steps and every 8th test image."""
    main = tecoa.main if script == "tecoa" else advflyp.main
    results = run_demo_reduced(main, [*flags, "--max-steps", "2"], tmp_path / script, monkeypatch)
    stdout = capsys.readouterr().out
    assert f"after ({label})" in stdout and "before (original CLIP)" in stdout
    assert results["method"] == method and results["after"]["n"] == results["before"]["n"] > 0
    for row in (results["before"], results["after"], results["proxy"]["before"], results["proxy"]["after"]):
        assert 0 <= row["pgd"] <= row["clean"] <= 100


def test_bad_input_is_one_line_without_traceback(tiny_ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {
        "no such directory": ["--data", str(tmp_path / "nowhere")],
        "exists and is not a directory": ["--data", "synthetic", "--out", str(tmp_path / "afile")],
    }
    env = {**os.environ, **SCRIPT_THREADS}
    procs = {msg: subprocess.Popen([sys.executable, "tecoa.py", "--model", tiny_ckpt, "--pmg", *argv], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg, argv in cases.items()}
    for msg, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 2, (msg, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ") and msg in stderr, stderr
        assert "Traceback" not in stderr + stdout
