"""advflyp.py: the losses against independent computations, the joint attack, and what is AdvFLYP's own in a real
run: CSV and img2dataset data with a broken image, early stopping, the flags' one-line errors. The caption readers
are in test_common.py; end to end with the other scripts: test_scripts.py."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import advflyp
import common
from conftest import load_weights, run_main_in_process, tiny_clip, write_images

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------- helpers
def unit_rows(x):
    return x / x.norm(dim=-1, keepdim=True)


def features(seed, n=6, d=8):
    """Raw features around a shared direction, so that cosine similarities spread like CLIP's (logits at scale
    100 a few units apart, not one-hot), with random norms; float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    f = torch.ones(n, d, dtype=torch.float64) + 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (f * (1 + 4 * torch.rand(n, 1, generator=g, dtype=torch.float64))).requires_grad_(True)


def close(a, b):
    """fp32 result a against float64 reference b: relative to the largest entry (logits reach 100)."""
    return torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def grads(fn, *tensors):
    """Gradient of fn(*tensors) w.r.t. each tensor (float64 leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves)


# --------------------------------------------------------------------------------------------------------- losses
def reference_contrastive(image, text, scale=100.0):
    """Eq. 1 written out: each image against all captions and each caption against all images."""
    s = scale * unit_rows(image) @ unit_rows(text).t()
    n = len(s)
    image_to_text = -sum(s[i, i] - torch.logsumexp(s[i, :], 0) for i in range(n)) / n
    text_to_image = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(n)) / n
    return (image_to_text + text_to_image) / 2


def test_contrastive_loss_matches_eq1_value_and_gradient():
    image, text = features(0), features(1)
    for scale in (100.0, 3.0):
        assert torch.allclose(advflyp.contrastive_loss(image, text, scale).double(),
                              reference_contrastive(image, text, scale), rtol=1e-5)
        mine = grads(lambda i, t: advflyp.contrastive_loss(i, t, scale), image, text)
        ref = grads(lambda i, t: reference_contrastive(i, t, scale), image, text)
        for a, b in zip(mine, ref):
            assert close(a, b)


def test_contrastive_loss_is_symmetric_and_scale_free():
    image, text = features(2), features(3)
    loss = advflyp.contrastive_loss(image, text)
    assert torch.allclose(loss, advflyp.contrastive_loss(text, image), rtol=1e-6)  # the two directions averaged
    assert torch.allclose(loss, advflyp.contrastive_loss(image * 7.0, text * 0.1), rtol=1e-5)  # normalised inside
    # matched pairs (every image its own caption's direction) give a lower loss than shuffled ones
    assert advflyp.contrastive_loss(text * 2, text) < advflyp.contrastive_loss(text.roll(1, 0), text)


def reference_kl(p, q):
    """KL(p ‖ q) per row, from probabilities (Algorithm 1: P * (P / Q).log())."""
    return (p * (p / q).log()).sum(-1)


def reference_logit_reg(adv, orig, clean, text, scale=100.0):
    softmax = lambda f: torch.softmax(scale * unit_rows(f) @ unit_rows(text).t(), dim=-1)  # noqa: E731
    p_adv, p_orig, p_clean = softmax(adv), softmax(orig), softmax(clean)
    return (reference_kl(p_adv, p_orig) + reference_kl(p_adv, p_clean)).mean()


def test_logit_reg_matches_eq12_value_and_gradient():
    adv, orig, clean, text = features(4), features(5), features(6), features(7)
    for scale in (100.0, 2.0):
        value = advflyp.logit_reg(adv, orig, clean, text, scale).double()
        assert torch.allclose(value, reference_logit_reg(adv, orig, clean, text, scale), rtol=1e-4)
        mine = grads(lambda a, c: advflyp.logit_reg(a, orig, c, text, scale), adv, clean)
        ref = grads(lambda a, c: reference_logit_reg(a, orig, c, text, scale), adv, clean)
        for a, b in zip(mine, ref):
            assert close(a, b)
    # the direction of Eq. 12 matters: KL(P_adv ‖ ·), not KL(· ‖ P_adv)
    softmax = lambda f: torch.softmax(2.0 * unit_rows(f) @ unit_rows(text).t(), dim=-1)  # noqa: E731
    reverse = (reference_kl(softmax(orig), softmax(adv)) + reference_kl(softmax(clean), softmax(adv))).mean()
    assert not torch.allclose(advflyp.logit_reg(adv, orig, clean, text, 2.0).double(), reverse, rtol=1e-3)


def test_logit_reg_is_nonnegative_and_zero_when_distributions_match():
    text = features(8)
    for seed in range(5):
        assert advflyp.logit_reg(features(10 + seed), features(20 + seed), features(30 + seed), text) >= 0
    same = features(9)
    loss = advflyp.logit_reg(same, same.detach() * 3, same.detach() * 0.5, text)  # same directions, same P
    assert abs(loss.item()) < 1e-6
    grad, = torch.autograd.grad(loss, same)
    assert grad.abs().max() < 1e-5


def test_logit_reg_frozen_branch_is_constant_clean_branch_is_not():
    adv, orig, clean, text = features(11), features(12), features(13), features(14)
    loss = advflyp.logit_reg(adv, orig, clean, text, 2.0)
    g_orig, g_clean = torch.autograd.grad(loss, [orig, clean], allow_unused=True)
    assert g_orig is None or g_orig.abs().max() == 0
    assert g_clean.abs().max() > 0


def reference_feature_reg(adv, orig, clean):
    """Eq. 8 as in Algorithm 1: per-sample L2 distances of unit features, unsquared, averaged."""
    a, o, c = unit_rows(adv), unit_rows(orig), unit_rows(clean)
    row = lambda d: torch.sqrt((d ** 2).sum(-1))  # noqa: E731
    return row(a - o).mean() + row(a - c).mean()


def test_feature_reg_matches_eq8_value_and_gradient():
    adv, orig, clean = features(15), features(16), features(17)
    assert torch.allclose(advflyp.feature_reg(adv, orig, clean).double(), reference_feature_reg(adv, orig, clean),
                          rtol=1e-5)
    mine = grads(lambda a, c: advflyp.feature_reg(a, orig, c), adv, clean)
    ref = grads(lambda a, c: reference_feature_reg(a, orig, c), adv, clean)
    for a, b in zip(mine, ref):
        assert close(a, b)
    # unsquared: doubling every distance doubles the loss (orthogonal unit vectors: each distance is sqrt(2))
    e = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(advflyp.feature_reg(e, e.roll(1, 1), e.roll(2, 1)).double(),
                          torch.tensor(2 * 2 ** 0.5, dtype=torch.float64))


def test_feature_reg_is_zero_with_finite_gradient_at_equality():
    same = features(18)
    loss = advflyp.feature_reg(same, same.detach() * 2, same * 0.5)  # as at ε = 0 before any update
    assert abs(loss.item()) < 1e-6
    grad, = torch.autograd.grad(loss, same)
    assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------- joint attack
def test_the_attack_is_joint_over_the_batch():
    """A sample's perturbation depends on the other samples of the batch under AdvFLYP's attack (Eq. 6), unlike
    under a per-sample loss, where it does not."""
    model = tiny_clip()
    encoder = common.ImageEncoder(model.visual)
    text = common.text_features(model, [f"a photo of thing {i}" for i in range(4)], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    x_other = x.clone()
    x_other[1:] = x[0]  # same first image, its companions now copies of it: hard negatives
    delta = (torch.rand(4, 3, 32, 32, generator=g) * 2 - 1) * 4 / 255
    joint = lambda x_: advflyp.contrastive_loss(encoder(x_), text)  # noqa: E731
    per_sample = lambda x_: F.cross_entropy(100 * common.cosine_sim(encoder(x_), text), torch.arange(4),  # noqa: E731
                                            reduction="sum")
    for loss, dependent in ((joint, True), (per_sample, False)):
        a = common.pgd(loss, x, 4 / 255, 1 / 255, 3, delta)
        b = common.pgd(loss, x_other, 4 / 255, 1 / 255, 3, delta)
        changed = (a[0] - b[0]).abs().gt(1e-6).float().mean().item()
        assert (changed > 0.2) if dependent else (changed == 0), (dependent, changed)


# ------------------------------------------------------------------------------------------------ caption data


# ------------------------------------------------------------------------------------------- in a real run
def train_args(tiny_ckpt, data, out, *extra):
    return ["--model", tiny_ckpt, "--data", data, "--out", out, "--batch-size", "4", "--epochs", "4", "--lr", "0.05",
            "--warmup", "1", "--eps", "4", "--workers", "0", "--log-every", "1", "--max-unreadable", "0.5", *extra]


def test_csv_run_logs_unreadable_images(tiny_ckpt, csv_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    code, stdout, stderr = run_main_in_process(advflyp.main, train_args(tiny_ckpt, csv_data, out), capsys)
    assert code == 0, stderr
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    epoch_ends = [rec for rec in records if rec["step"] % 2 == 0]  # 8 pairs / batch 4: 2 steps per epoch
    assert [rec["unreadable_images"] for rec in epoch_ends] == [1, 1, 1, 1]  # 2 steps x 4 pairs = every pair
    assert stdout.count("1 unreadable image(s), each replaced") == 4
    assert records[-1]["step"] == 8 and all(np.isfinite(rec["loss"]) for rec in records if "loss" in rec)
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["method"] == "advflyp" and args["reg"] == "full"


def test_img2dataset_run_with_early_stopping(tiny_ckpt, tmp_path, capsys):
    """img2dataset data with a broken image; early stopping on a validation set whose accuracy cannot change (one
    image, in both of its two class folders; ε = 0): the second evaluation is no improvement, so the run stops after
    2 of 4 epochs and model.pt holds the first epoch's weights."""
    data = tmp_path / "laion"
    write_images(data, [f"0000{s}/00000{s}00{i}.jpg" for s in range(2) for i in range(4)])
    for s in range(2):
        for i in range(4):
            (data / f"0000{s}" / f"00000{s}00{i}.txt").write_text(f"a web photo {s} {i}")
    (data / "00001" / "000001002.jpg").write_bytes(b"")
    write_images(tmp_path / "val", ["cat/0.png"])
    (tmp_path / "val" / "dog").mkdir()
    (tmp_path / "val" / "dog" / "0.png").write_bytes((tmp_path / "val" / "cat" / "0.png").read_bytes())
    out = str(tmp_path / "run")
    args = train_args(tiny_ckpt, str(data), out, "--patience", "1", "--val-data", str(tmp_path / "val"),
                      "--val-steps", "2", "--reg", "feat", "--eps", "0")
    code, stdout, stderr = run_main_in_process(advflyp.main, args, capsys)
    assert code == 0, stderr
    assert "early stop" in stdout and "unreadable image(s), each replaced" in stdout
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = [rec for rec in records if "val" in rec]
    assert [(e["step"], e["val"]["pgd"], e["stopped"]) for e in evals] == [(2, 50.0, False), (4, 50.0, True)]
    best, last, model = (load_weights(os.path.join(out, f)) for f in ("best.pt", "last.pt", "model.pt"))
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 4
    assert all(torch.allclose(model[k], best[k]) for k in best)
    assert not all(torch.allclose(model[k], last[k]) for k in last)
    code, stdout, stderr = run_main_in_process(advflyp.main, args, capsys)  # rerun: stopped, nothing more to train
    assert code == 0 and "resuming" in stdout and "early stop" not in stdout, stderr
    assert all(torch.allclose(load_weights(os.path.join(out, "model.pt"))[k], best[k]) for k in best)


def test_bad_input_is_one_line_and_writes_nothing(tiny_ckpt, csv_data, tmp_path, capsys):
    """AdvFLYP's own data and flags (the checks every script shares: test_scripts.py)."""
    (tmp_path / "cols.csv").write_text("image,caption\na.png,b\n")
    cases = {
        "no such file or directory": ["--data", str(tmp_path / "nowhere.csv")],
        "no column 'filepath' or 'title'": ["--data", str(tmp_path / "cols.csv")],
        "--reg sometimes: must be one of": ["--data", csv_data, "--reg", "sometimes"],
    }
    for message, argv in cases.items():
        out = tmp_path / "out"
        code, _, stderr = run_main_in_process(advflyp.main, ["--model", tiny_ckpt, "--workers", "0", "--out", str(out),
                                                             *argv], capsys)
        assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr and not out.exists(), (message, stderr)
