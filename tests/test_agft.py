"""AGFT: the loss (Eq. 8, 9, 11) against independent computations, PGD invariants, the shared training harness
(world-size independence, loading, checkpoints) and agft.py end to end (1 and 2 processes, kill + resume, demo,
bad input)."""
import json
import os
import signal

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import load_weights, run_and_kill, run_script, tiny_clip

import agft  # noqa: E402
import common  # noqa: E402


def _np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sims(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, generator=g) * 2 - 1, torch.rand(b, c, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------- the AGFT loss
def test_eq11_temperature_form_equals_logit_scaling_form():
    """Eq. 8 (temperature τ/γ) and Eq. 11 (original logits scaled by γ, temperature τ) give the same target."""
    _, orig = _sims()
    tau, gamma = 1 / 180, 0.4
    s = orig.double().numpy()
    temperature_form = np.exp(s / (tau / gamma)) / np.exp(s / (tau / gamma)).sum(-1, keepdims=True)
    logit_scaling_form = _np_softmax((gamma * s) / tau)
    np.testing.assert_allclose(temperature_form, logit_scaling_form, rtol=1e-10)
    # and agft_loss uses that target: with adv == a sharp copy of the target, the loss is its entropy-based value
    adv = torch.zeros_like(orig)
    expected = -(logit_scaling_form * np.log(_np_softmax(adv.double().numpy() / tau))).sum(-1).mean()
    assert abs(agft_loss_value(adv, orig, tau, gamma) - expected) < 1e-5


def agft_loss_value(adv, orig, tau, gamma):
    return agft.agft_loss(adv, orig, tau, gamma).item()


@pytest.mark.parametrize("tau,gamma", [(1 / 180, 0.4), (1 / 100, 1.0), (0.07, 0.25)])
def test_agft_loss_value_and_gradient_against_numpy(tau, gamma):
    adv, orig = _sims(seed=1)
    adv.requires_grad_(True)
    loss = agft.agft_loss(adv, orig, tau, gamma)
    loss.backward()
    a, o = adv.detach().double().numpy(), orig.double().numpy()
    p_rob = _np_softmax(o * gamma / tau)  # Eq. 8
    log_p = np.log(_np_softmax(a / tau))  # Eq. 9
    expected = -(p_rob * log_p).sum(-1).mean()
    assert abs(loss.item() - expected) < 1e-4 * max(1.0, abs(expected))
    # d/d adv of mean_i CE(adv_i/τ, p_rob_i) = (softmax(adv/τ) − p_rob) / (τ B)
    expected_grad = (_np_softmax(a / tau) - p_rob) / (tau * a.shape[0])
    np.testing.assert_allclose(adv.grad.double().numpy(), expected_grad, rtol=1e-3, atol=1e-4)
    # the target is a constant: no gradient flows to the original similarities
    orig.requires_grad_(True)
    agft.agft_loss(adv.detach().requires_grad_(True), orig, tau, gamma).backward()
    assert orig.grad is None


def test_gamma_one_is_plain_soft_target():
    adv, orig = _sims(seed=2)
    tau = 1 / 180
    expected = -(F.softmax(orig / tau, -1) * F.log_softmax(adv / tau, -1)).sum(-1).mean()
    assert torch.allclose(agft.agft_loss(adv, orig, tau, 1.0), expected, rtol=1e-5)


def test_large_gamma_over_tau_tends_to_cross_entropy_on_original_argmax():
    adv, orig = _sims(seed=3)
    target = orig.argmax(-1)
    gaps = []
    for tau in (1e-1, 1e-2, 1e-3):
        ce = F.cross_entropy(adv.double() / tau, target)
        gaps.append(abs(agft.agft_loss(adv.double(), orig.double(), tau, 1.0).item() - ce.item()) / ce.item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


@pytest.mark.parametrize("tau,gamma", [(1 / 180, 0.0), (1 / 180, 1.5), (1 / 180, -0.4), (0.0, 0.4), (-1.0, 0.4)])
def test_agft_loss_rejects_bad_parameters(tau, gamma):
    adv, orig = _sims()
    with pytest.raises(ValueError):
        agft.agft_loss(adv, orig, tau, gamma)


# ------------------------------------------------------------------------------------------------------------ PGD
@pytest.fixture(scope="module")
def tiny_encoder():
    model = tiny_clip()
    enc = common.ImageEncoder(model.visual).eval()
    text = common.text_features(model, common.prompts_for([f"class {i}" for i in range(7)]), "cpu")
    return enc, text


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_pgd_stays_in_eps_ball_and_image_range(tiny_encoder, amp):
    enc, text = tiny_encoder
    _, ctx, _ = common.amp_setup(amp, torch.device("cpu"))
    x = torch.rand(6, 3, 32, 32)
    x[0] = 0.0  # saturated images test the [0, 1] clamp
    x[1] = 1.0
    y = torch.arange(6) % 7
    eps = 8 / 255

    def loss_fn(x_adv):
        with ctx:
            return F.cross_entropy(100 * common.cosine_sim(enc(x_adv), text), y)

    x_adv = common.pgd(loss_fn, x, eps, 2 / 255, 5)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in enc.parameters()), "the attack must not accumulate parameter gradients"


def test_pgd_increases_loss_and_eps_zero_is_identity(tiny_encoder):
    enc, text = tiny_encoder
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss_fn = lambda xa: F.cross_entropy(100 * common.cosine_sim(enc(xa), text), y)  # noqa: E731
    assert torch.equal(common.pgd(loss_fn, x, 0.0, 1 / 255, 5), x)
    x_adv = common.pgd(loss_fn, x, 4 / 255, 1 / 255, 10)
    with torch.no_grad():
        assert loss_fn(x_adv) > loss_fn(x)


def test_random_start_and_batches_do_not_depend_on_world_size():
    shape = (8, 3, 4, 4)
    one = common.random_start(shape, 0.1, seed=3, step=5, rank=0, world=1, device="cpu")
    two = torch.cat([common.random_start(shape, 0.1, 3, 5, r, 2, "cpu") for r in range(2)])
    assert torch.equal(one, two) and one.abs().max() <= 0.1
    s1 = common.GlobalBatchSampler(37, 8, 0, 1, seed=1)
    s2 = [common.GlobalBatchSampler(37, 8, r, 2, seed=1) for r in range(2)]
    for epoch in (0, 1):
        s1.set_epoch(epoch)
        [s.set_epoch(epoch) for s in s2]
        batches1 = list(s1)
        batches2 = [a + b for a, b in zip(*[list(s) for s in s2])]
        assert batches1 == batches2 and len(batches1) == 37 // 8
    s1.set_epoch(1, start=2)  # resume skips the batches already done
    s1b = common.GlobalBatchSampler(37, 8, 0, 1, seed=1)
    s1b.set_epoch(1)
    assert list(s1) == list(s1b)[2:]


def test_cosine_lr_schedule():
    lrs = [common.cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ------------------------------------------------------------------------------------------------------- loading
def test_load_clip_formats(tmp_path, tiny_ckpt):
    ref = tiny_clip().state_dict()
    model = common.load_clip(tiny_ckpt)
    assert isinstance(model, clip.model.CLIP) and all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())
    ts = str(tmp_path / "model.pt")
    common.save_torchscript(model, ts)
    model2 = common.load_clip(ts)  # TorchScript archive, read back exactly in fp32
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in ref.items())
    rnd = common.load_clip("random:tiny", seed=0)
    assert rnd.visual.input_resolution == 32 and next(rnd.parameters()).dtype == torch.float32
    with pytest.raises(common.UsageError, match="no such file"):
        common.load_clip(str(tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="unreadable checkpoint"):
        common.load_clip(str(tmp_path / "corrupt.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(common.UsageError, match="not a CLIP checkpoint"):
        common.load_clip(str(tmp_path / "other.pt"))
    with pytest.raises(common.UsageError, match="unknown architecture"):
        common.load_clip("random:ViT-X/99")


# ---------------------------------------------------------------------------------------------------- end to end
TINY = ["--data", "synthetic", "--synthetic-size", "48", "--batch-size", "8", "--epochs", "1", "--warmup", "2",
        "--lr", "0.05", "--eps", "4", "--workers", "0", "--amp", "off", "--log-every", "1"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_ckpt):
    out = str(tmp_path_factory.mktemp("agft") / "run1")
    r = run_script(["agft.py", "--model", tiny_ckpt, *TINY, "--out", out])
    assert r.returncode == 0, r.stderr
    return out


def test_single_process_run_writes_everything(single_run, tiny_ckpt):
    names = set(os.listdir(single_run))
    assert {"args.json", "log.jsonl", "last.pt", "model.pt"} <= names and not any(n.endswith(".tmp") for n in names)
    records = [json.loads(line) for line in open(os.path.join(single_run, "log.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 7))  # 48 images / batch 8 = 6 steps
    assert {"step", "epoch", "loss", "lr", "img_per_s", "s_per_step", "peak_mem_mib"} <= set(records[0])
    assert all(np.isfinite(r["loss"]) for r in records)
    assert json.load(open(os.path.join(single_run, "args.json")))["gamma"] == 0.4
    ckpt = torch.load(os.path.join(single_run, "last.pt"), weights_only=True)
    assert ckpt["step"] == 6 and {"model", "optimizer", "scaler", "scheduler", "rng", "args"} <= set(ckpt)
    # the image encoder moved, the text encoder did not
    before, after = load_weights(tiny_ckpt), ckpt["model"]
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))


def test_model_pt_loads_with_clip_load(single_run):
    """model.pt is a TorchScript archive that clip.load reads without this project (clip rounds the weight
    matrices to fp16, as it does for OpenAI's releases; common.load_clip keeps them exactly)."""
    trained = load_weights(os.path.join(single_run, "last.pt"))
    model, preprocess = clip.load(os.path.join(single_run, "model.pt"), device="cpu", jit=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]) or torch.equal(v, trained[k].half().float()), k
    exact = common.load_clip(os.path.join(single_run, "model.pt"))
    assert all(torch.equal(v, trained[k]) for k, v in exact.state_dict().items())


def test_two_processes_equal_one(single_run, tiny_ckpt, tmp_path):
    out = str(tmp_path / "run2")
    r = run_script(["agft.py", "--model", tiny_ckpt, *TINY, "--out", out], nproc=2)
    assert r.returncode == 0, r.stderr
    one, two = load_weights(os.path.join(single_run, "last.pt")), load_weights(os.path.join(out, "last.pt"))
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    log1 = [json.loads(line)["loss"] for line in open(os.path.join(single_run, "log.jsonl"))]
    log2 = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    np.testing.assert_allclose(log1, log2, rtol=1e-4)


def test_kill_and_resume_matches_uninterrupted(tiny_ckpt, tmp_path):
    args = ["agft.py", "--model", tiny_ckpt, *TINY, "--synthetic-size", "96", "--save-every", "2"]
    ref = str(tmp_path / "ref")
    assert run_script(args + ["--out", ref]).returncode == 0
    out = str(tmp_path / "killed")
    log = os.path.join(out, "log.jsonl")
    code = run_and_kill(args + ["--out", out], lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 5)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "model.pt"))
    step_at_kill = torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"]
    assert 0 < step_at_kill < 12
    r = run_script(args + ["--out", out])
    assert r.returncode == 0, r.stderr
    assert f"from step {step_at_kill}/12" in r.stdout
    a, b = load_weights(os.path.join(ref, "model.pt")), load_weights(os.path.join(out, "model.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_demo_runs_and_reports(tmp_path):
    out = str(tmp_path / "demo")
    r = run_script(["agft.py", "--demo", "--max-steps", "3", "--out", out])
    assert r.returncode == 0, r.stderr
    res = json.load(open(os.path.join(out, "results.json")))
    for when in ("before", "after"):
        assert set(res[when]) == {"n", "clean", "pgd"} and res[when]["n"] > 0
        assert 0 <= res[when]["pgd"] <= res[when]["clean"] <= 100
    assert res["before"]["clean"] > 80, "the pretrained demo CLIP should classify held-out concepts zero-shot"
    assert set(res["held_out_concepts"]).isdisjoint(res["proxy_concepts"])
    assert "held-out clean" in r.stdout


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("extra,message", [
    (["--gamma", "0"], "--gamma 0.0: must be in (0, 1]"),
    (["--gamma", "1.5"], "--gamma 1.5: must be in (0, 1]"),
    (["--tau", "0"], "--tau 0.0: must be > 0"),
    (["--eps", "-1"], "--eps -1.0: must be >= 0"),
    (["--data", "/nonexistent/imagenet"], "--data /nonexistent/imagenet: no such directory"),
    (["--model", "/nonexistent/model.pt"], "--model /nonexistent/model.pt: no such file"),
    (["--model", "CORRUPT"], "unreadable checkpoint"),
])
def test_bad_input_one_line_error(tmp_path, tiny_ckpt, extra, message):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    extra = [str(corrupt) if e == "CORRUPT" else e for e in extra]
    out = tmp_path / "out"
    r = run_script(["agft.py", "--model", tiny_ckpt, *TINY, "--out", str(out), *extra])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists(), "nothing may be written for bad input"


def test_out_that_is_a_file(tmp_path, tiny_ckpt):
    out = tmp_path / "taken"
    out.write_text("precious")
    r = run_script(["agft.py", "--model", tiny_ckpt, *TINY, "--out", str(out)])
    assert r.returncode == 2 and "exists and is not a directory" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text() == "precious"
