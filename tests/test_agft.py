"""AGFT (agft.py): the loss (Eq. 8, 9, 11) against independent computations, its limits in γ/τ, the defaults and
the flags of its own. End to end with the other scripts: test_scripts.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import agft
import common
from conftest import run_main_in_process


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


# ----------------------------------------------------------------------------------------------- the command line
def test_defaults_are_the_papers():
    args = agft.parse_args(["--data", "synthetic"])
    assert (args.gamma, args.tau, args.lr, args.momentum, args.weight_decay, args.warmup, args.batch_size,
            args.epochs, args.eps, args.alpha, args.attack_steps, args.model) == \
        (0.4, 1 / 180, 4e-4, 0.9, 0.0, 1000, 256, 10, 1.0, 1.0, 2, "ViT-B/32")
    demo = agft.parse_args(["--demo"])
    assert {k: getattr(demo, k) for k in common.DEMO_DEFAULTS} == common.DEMO_DEFAULTS
    assert agft.parse_args(["--demo", "--lr", "0.5"]).lr == 0.5  # a flag given explicitly wins over the demo's


def test_tau_takes_a_number_or_a_fraction(capsys):
    """--tau 1/140 as the paper writes it (Table 8's 1/τ), or a number; anything else is argparse's error."""
    assert agft.parse_args(["--data", "synthetic", "--tau", "1/140"]).tau == 1 / 140
    assert agft.parse_args(["--data", "synthetic", "--tau", "0.005"]).tau == 0.005
    for bad in ("1/0", "tiny"):
        with pytest.raises(SystemExit):
            agft.parse_args(["--data", "synthetic", "--tau", bad])
        assert "expected a number or a fraction such as 1/180" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--gamma", "0"], "--gamma 0.0: must be in (0, 1]"),
    (["--gamma", "1.5"], "--gamma 1.5: must be in (0, 1]"),
    (["--tau", "0"], "--tau 0.0: must be > 0"),
    (["--data", "/nonexistent/imagenet"], "--data /nonexistent/imagenet: no such directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_ckpt, capsys, extra, message):
    """AGFT's own flags (the checks every script shares: test_scripts.py)."""
    out = tmp_path / "out"
    code, _, stderr = run_main_in_process(agft.main, ["--model", tiny_ckpt, "--data", "synthetic", "--workers", "0",
                                                      "--out", str(out), *extra], capsys)
    assert code == 2 and stderr.startswith(f"error: {message}") and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()
