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


def test_reg_terms_orig_keeps_term_ii_alone():
    """--reg-terms orig (the paper's Table 7): clean_features=None leaves KL(P_adv,θ ‖ P_adv,orig) and
    mean ‖x̂_adv,θ − x̂_adv,orig‖, against the same independent computations; the full loss is their sum with the
    clean terms."""
    adv, orig, clean, text = features(40), features(41), features(42), features(43)
    softmax = lambda f: torch.softmax(100.0 * unit_rows(f) @ unit_rows(text).t(), dim=-1)  # noqa: E731
    term_ii = reference_kl(softmax(adv), softmax(orig)).mean()
    assert torch.allclose(advflyp.logit_reg(adv, orig, None, text).double(), term_ii, rtol=1e-4)
    mine = grads(lambda a: advflyp.logit_reg(a, orig, None, text), adv)
    ref = grads(lambda a: reference_kl(softmax(a), softmax(orig)).mean(), adv)
    assert close(mine[0], ref[0])
    distance = lambda a, b: torch.sqrt(((unit_rows(a) - unit_rows(b)) ** 2).sum(-1)).mean()  # noqa: E731
    assert torch.allclose(advflyp.feature_reg(adv, orig, None).double(), distance(adv, orig), rtol=1e-5)
    assert torch.allclose(advflyp.feature_reg(adv, orig, clean).double(), distance(adv, orig) + distance(adv, clean),
                          rtol=1e-5)
    assert advflyp.logit_reg(adv, orig, None, text) < advflyp.logit_reg(adv, orig, clean, text)


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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------- the ablations' flags (Tables 6-8)
def test_text_encoder_is_encode_text_on_shared_parameters():
    """--train text|all: TextEncoder gives CLIP.encode_text's features exactly (the same ops), and its parameters
    are the CLIP's own, every one outside the image encoder except logit_scale, so that training it trains what
    model.pt saves."""
    model = tiny_clip(3)
    tokens = common.tokenize(model, ["a red ring.", "a photo of a blue bar that is long."])
    encoder = advflyp.TextEncoder(model)
    assert torch.equal(encoder(tokens), model.encode_text(tokens))
    shared = {id(p) for p in encoder.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in shared}
    assert len(names) == len(shared)  # each one a parameter of the CLIP itself
    assert names == {n for n, _ in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}


@pytest.mark.slow
def test_train_text_and_all_update_what_they_say(tiny_ckpt, csv_data, tmp_path, capsys):
    """--train image leaves the text encoder and logit_scale as they were; text trains the text encoder too; all
    trains logit_scale as well, clamped to [0, ln 100] as the official code does."""
    before = load_weights(tiny_ckpt)
    text_keys = [k for k in before if not k.startswith("visual.") and k != "logit_scale"]
    changed = {}
    for train in advflyp.TRAINED:
        out = str(tmp_path / train)
        code, stdout, stderr = run_main_in_process(advflyp.main, train_args(
            tiny_ckpt, csv_data, out, "--train", train, "--max-steps", "2"), capsys)
        assert code == 0, stderr
        assert advflyp.TRAINED_WHAT[train] in stdout
        after = load_weights(os.path.join(out, "model.pt"))
        changed[train] = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("visual.") for k in changed[train])
        if train == "all":
            assert after["logit_scale"].item() <= np.log(100) + 1e-6
    assert not any(k in changed["image"] for k in text_keys) and "logit_scale" not in changed["image"]
    assert all(k in changed["text"] for k in text_keys) and "logit_scale" not in changed["text"]
    assert all(k in changed["all"] for k in text_keys) and "logit_scale" in changed["all"]


def test_class_captions_caption_each_image_with_its_class_prompt(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """--class-captions ('naive FLYP', Table 8): an ImageFolder, every image captioned 'This is a photo of a
    {class}.' (the batch's captions are what the text encoder is asked to encode)."""
    write_images(tmp_path / "tree", [f"{c}/{i}.png" for c in ("red_fox", "tabby-cat") for i in range(4)])
    seen = []
    text_features = common.text_features
    monkeypatch.setattr(common, "text_features", lambda m, prompts, *a, **k: (
        seen.extend(prompts), text_features(m, prompts, *a, **k))[1])
    out = str(tmp_path / "run")
    code, stdout, stderr = run_main_in_process(advflyp.main, train_args(
        tiny_ckpt, str(tmp_path / "tree"), out, "--class-captions", "--max-steps", "2"), capsys)
    assert code == 0, stderr
    assert "(class prompts as captions)" in stdout
    assert len(seen) == 8 and set(seen) == {"This is a photo of a red fox.", "This is a photo of a tabby cat."}
    code, _, stderr = run_main_in_process(advflyp.main, train_args(
        tiny_ckpt, str(tmp_path / "tree" / "nowhere"), out + "2", "--class-captions"), capsys)
    assert code == 2 and "--class-captions --data" in stderr and "no such directory" in stderr


def test_reg_terms_clean_keeps_the_adversarial_vs_clean_terms_alone():
    """--reg-terms clean (Table 7's other reading: the second term of Eq. 8 and Eq. 12 by position):
    orig_adv_features=None leaves KL(P_adv,θ ‖ P_clean,θ) and mean ‖x̂_adv,θ − x̂_clean,θ‖, against independent
    computations; with orig the sum is the full regulariser."""
    adv, orig, clean, text = features(50), features(51), features(52), features(53)
    softmax = lambda f: torch.softmax(100.0 * unit_rows(f) @ unit_rows(text).t(), dim=-1)  # noqa: E731
    term_i = reference_kl(softmax(adv), softmax(clean)).mean()
    assert torch.allclose(advflyp.logit_reg(adv, None, clean, text).double(), term_i, rtol=1e-4)
    mine = grads(lambda a: advflyp.logit_reg(a, None, clean, text), adv)
    assert close(mine[0], grads(lambda a: reference_kl(softmax(a), softmax(clean)).mean(), adv)[0])
    distance = lambda a, b: torch.sqrt(((unit_rows(a) - unit_rows(b)) ** 2).sum(-1)).mean()  # noqa: E731
    assert torch.allclose(advflyp.feature_reg(adv, None, clean).double(), distance(adv, clean), rtol=1e-5)
    total = advflyp.logit_reg(adv, orig, None, text) + advflyp.logit_reg(adv, None, clean, text)
    assert torch.allclose(advflyp.logit_reg(adv, orig, clean, text), total, rtol=1e-6)
    assert advflyp.parse_args(["--data", "synthetic", "--reg-terms", "clean"]).reg_terms == "clean"


def test_reg_terms_without_a_regulariser_is_refused(tiny_ckpt, csv_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run_main_in_process(advflyp.main, train_args(
        tiny_ckpt, csv_data, str(out), "--reg", "none", "--reg-terms", "orig"), capsys)
    assert code == 2 and "--reg-terms orig: there is no regulariser" in stderr and not out.exists()


@pytest.mark.slow
def test_train_all_with_two_processes_follows_one(tiny_ckpt, tmp_path):
    """--train all under torchrun (gloo): the text encoder in its own DDP module and logit_scale in none (its
    gradient divided by the number of processes by hand) follow the one-process run: the same losses, and the text
    embeddings and logit_scale of the two trained models agree to under 0.1% of how far training moved them."""
    import clip
    from conftest import run_script
    outs = {n: tmp_path / f"p{n}" for n in (1, 2)}
    for n, out in outs.items():
        r = run_script(["advflyp.py", "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "24",
                        "--batch-size", "4", "--epochs", "2", "--lr", "0.05", "--warmup", "1", "--eps", "4",
                        "--workers", "0", "--amp", "off", "--log-every", "1", "--train", "all", "--out", str(out)],
                       nproc=n)
        assert r.returncode == 0, r.stderr[-3000:]
    losses = lambda p: [json.loads(line)["loss"] for line in open(p / "log.jsonl") if "loss" in line]  # noqa: E731
    np.testing.assert_allclose(losses(outs[1]), losses(outs[2]), rtol=1e-3)
    start, one, two = (load_weights(p) for p in (tiny_ckpt, outs[1] / "last.pt", outs[2] / "last.pt"))
    models = [common.clip_from_state_dict(w) for w in (start, one, two)]
    tokens = clip.tokenize(["a photo of a class 3.", "a photo of a class 71."], context_length=models[0].context_length)
    with torch.no_grad():
        text = [m.encode_text(tokens) for m in models]
    assert (text[1] - text[2]).abs().max() < 1e-3 * (text[1] - text[0]).abs().max()
    moved = (one["logit_scale"] - start["logit_scale"]).abs().item()
    assert moved > 0 and (one["logit_scale"] - two["logit_scale"]).abs().item() < 1e-3 * moved
