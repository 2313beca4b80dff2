"""fare.py: the loss (Eq. 3) against an independent computation (value and gradient), the attack on it against the
official momentum-sign update, the defaults, and what is FARE's own in a real run (AdamW's state, caption CSV and
ImageNet-root data without labels, one-line errors). The image-only readers are in test_common.py; end to end with the
other scripts: test_scripts.py."""
import json
import os

import numpy as np
import pytest
import torch

import common
import fare
from conftest import load_weights, tiny_clip, write_images

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs and attacks on one thread, as the subprocesses


# ------------------------------------------------------------------------------------------------------- the loss
def test_fare_loss_value_and_gradient_against_a_loop():
    """Eq. 3 written out in float64: mean over i of Σ_d (a[i, d] − o[i, d])², and its gradient 2 (a − o) / B."""
    g = torch.Generator().manual_seed(0)
    adv = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)  # raw, not unit norm
    orig = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    a, o = adv.detach().tolist(), orig.detach().tolist()
    expected = sum(sum((a[i][d] - o[i][d]) ** 2 for d in range(7)) for i in range(5)) / 5
    loss = fare.fare_loss(adv, orig)
    assert loss.dtype == torch.float32  # computed in fp32, also under AMP
    assert abs(loss.item() - expected) < 1e-5 * expected
    grad_adv, grad_orig = torch.autograd.grad(loss, [adv, orig], allow_unused=True)
    np.testing.assert_allclose(grad_adv.numpy(), 2 * (np.array(a) - np.array(o)) / 5, rtol=1e-5, atol=1e-6)
    assert grad_orig is None or not grad_orig.any(), "f_orig(x) is a constant"


def test_fare_loss_is_on_raw_embeddings_summed_over_the_dimension_averaged_over_the_batch():
    adv, orig = torch.zeros(2, 4), torch.ones(2, 4)
    assert fare.fare_loss(adv, orig).item() == 4.0  # not 1 (a mean over d), not 8 (a sum over the batch)
    g = torch.Generator().manual_seed(1)
    adv, orig = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    assert torch.allclose(fare.fare_loss(5 * adv, 5 * orig), 25 * fare.fare_loss(adv, orig), rtol=1e-5)  # raw
    assert fare.fare_loss(orig.clone(), orig).item() == 0.0


def test_pgd_on_the_fare_loss_moves_the_embedding_away():
    """At θ = θ_orig the loss is 0 on clean x; PGD-10 (α = 1/255) finds x_adv in the ε-ball whose embedding is far
    from the clean one, farther than its random start, without touching parameter gradients."""
    encoder = common.ImageEncoder(tiny_clip().visual).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        orig = encoder(x)
    loss = lambda z: fare.fare_loss(encoder(z), orig)  # noqa: E731
    eps = 4 / 255
    delta = common.random_start(x.shape, eps, seed=0, step=0, rank=0, world=1, device="cpu")
    x_adv = common.pgd(loss, x, eps, 1 / 255, 10, delta)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        assert loss(x).item() == 0 and loss(x_adv) > 2 * loss((x + delta).clamp(0, 1))
    assert all(p.grad is None for p in encoder.parameters())


def official_momentum_pgd(loss_fn, x, eps, alpha, steps, delta, momentum=0.9):
    """The FARE authors' ℓ∞ update (RobustVLM train/pgd_train.py), written from its description: the gradient's sign
    is added to momentum × the previous velocity and the sum normalised to its sign, v ← sign(0.9·v + sign(∇)),
    δ ← δ + α·v, then the ε-ball and [0, 1]. Started, like common.pgd, at clamp(x + δ₀, 0, 1)."""
    x_adv, v = (x + delta).clamp(0, 1), torch.zeros_like(x)
    for _ in range(steps):
        v = (momentum * v + common.input_grad(loss_fn, x_adv).sign()).sign()
        x_adv = (x + (x_adv + alpha * v - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_the_official_momentum_update_is_sign_pgd_except_at_zero_gradients():
    """docs/fare.md: sign(0.9·v + g) = g wherever g ≠ 0, so the official attack equals our PGD on the FARE loss; an
    entry whose gradient is exactly 0 repeats the previous step there instead of standing still."""
    encoder = common.ImageEncoder(tiny_clip().visual).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        orig = encoder(x)
    loss = lambda z: fare.fare_loss(encoder(z), orig)  # noqa: E731
    delta = common.random_start(x.shape, 4 / 255, seed=1, step=0, rank=0, world=1, device="cpu")
    assert torch.equal(official_momentum_pgd(loss, x, 4 / 255, 1 / 255, 10, delta),
                       common.pgd(loss, x, 4 / 255, 1 / 255, 10, delta))
    calls = []

    def gradient_then_none(z):  # ∇ = 1 at the first step, exactly 0 at the second
        calls.append(1)
        return z.sum() * (1.0 if len(calls) % 2 else 0.0)
    x = torch.full((1, 4), 0.5)
    zero = torch.zeros_like(x)
    assert torch.allclose(common.pgd(gradient_then_none, x, 0.1, 0.01, 2, zero), x + 0.01)
    assert torch.allclose(official_momentum_pgd(gradient_then_none, x, 0.1, 0.01, 2, zero), x + 0.02)


# ------------------------------------------------------------------------------------------------ image-only data


def test_defaults_are_the_fare_authors_and_the_demo_is_the_others():
    args = fare.parse_args(["--data", "synthetic", "--out", "unused"])  # the default ./data/imagenet is not here
    assert (args.lr, args.weight_decay, args.warmup, args.batch_size, args.epochs, args.max_steps) == \
        (1e-5, 1e-4, 1400, 128, 2, 20_000)
    assert (args.eps, args.alpha, args.attack_steps, args.model, args.method) == (1.0, 1.0, 10, "ViT-B/32", "fare")
    assert not hasattr(args, "momentum")  # AdamW: SGD's flag does not exist here
    demo = fare.parse_args(["--demo", "--out", "unused"])
    assert {k: getattr(demo, k) for k in common.DEMO_DEFAULTS} == common.DEMO_DEFAULTS and demo.lr == 1e-3
    assert (demo.alpha, demo.attack_steps) == (1.0, 10)  # FARE's attack at the demo's ε = 4/255


# ---------------------------------------------------------------------------------------------------- end to end
def train_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", out, "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
            "--eps", "4", "--workers", "0", "--amp", "off", "--log-every", "1", "--max-unreadable", "0.5", *extra]


@pytest.fixture(scope="module")
def single_run(one_thread, tiny_ckpt, csv_data, tmp_path_factory):
    """FARE's defaults (2 epochs, PGD-10, AdamW) on 8 images in batches of 4: 4 steps, in this process."""
    out = str(tmp_path_factory.mktemp("fare") / "one")
    fare.main(train_args(tiny_ckpt, csv_data, out))
    return out


def test_csv_run_writes_everything_and_trains_the_image_encoder_only(single_run, tiny_ckpt):
    names = set(os.listdir(single_run))
    assert {"args.json", "log.jsonl", "last.pt", "model.pt"} <= names and not any(n.endswith(".tmp") for n in names)
    records = [json.loads(line) for line in open(os.path.join(single_run, "log.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert [r["unreadable_images"] for r in records if r["step"] % 2 == 0] == [1, 1]  # one broken image per epoch
    ckpt = torch.load(os.path.join(single_run, "last.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["data"]["size"] == 8 and ckpt["args"]["method"] == "fare"
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(ckpt["optimizer"]["state"].values())))  # Adam's moments
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    before, after = load_weights(tiny_ckpt), ckpt["model"]
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))


def test_imagefolder_data_trains(tiny_ckpt, tmp_path, capsys):
    """An ImageNet-style root: train/<class>/ images are read (no devkit, no class names needed), val/ is not."""
    write_images(tmp_path / "imagenet", [f"train/n0{c}/{i}.JPEG" for c in range(3) for i in range(2)]
                 + ["val/n00/v.JPEG", "val/n01/w.JPEG"])
    out = str(tmp_path / "run")
    fare.main(train_args(tiny_ckpt, str(tmp_path / "imagenet"), out, "--batch-size", "2", "--max-steps", "2",
                         "--attack-steps", "2"))
    assert f"FARE: 6 images (every image under {tmp_path / 'imagenet' / 'train'})" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["data"]["size"] == 6 and ckpt["scheduler"]["total"] == 2


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_and_writes_nothing(tiny_ckpt, csv_data, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cols.csv").write_text("image,caption\na.png,b\n")
    cases = {
        "--data /nonexistent/imagenet: no such file or directory": ["--data", "/nonexistent/imagenet"],
        "no image files under": ["--data", str(tmp_path / "empty")],
        "no column 'filepath'": ["--data", str(tmp_path / "cols.csv")],
        "--eps -1.0: must be >= 0": ["--data", csv_data, "--eps", "-1"],
        "fewer than one global batch": ["--data", csv_data, "--batch-size", "16"],
    }
    for message, argv in cases.items():
        out = tmp_path / "out"
        with pytest.raises(common.UsageError, match=message.replace("(", r"\(")) as e:
            fare.main(["--model", tiny_ckpt, "--workers", "0", "--out", str(out), *argv])
        assert "\n" not in str(e.value) and not out.exists(), message
