"""tecoa.py: TeCoA's and PMG-AFT's losses, and TGA-ZSR's text-guided attention maps and loss, against independent
computations; the defaults and flags of each; what each adds to TeCoA acts in a real run; TGA-ZSR's one-line errors.
End to end with the other scripts: test_scripts.py."""
import json
import os

import numpy as np
import pytest
import torch

import common
import tecoa
from conftest import load_weights, run_main_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_reg_logit_is_pmg_with_its_kls_reversed():
    """tecoa.py --reg logit (the AdvFLYP paper's Table 9: TeCoA + L_logit over the class prompts, which that paper
    calls PMG-AFT, as its code computes it) against --pmg (PMG-AFT as its authors write it): the same three
    distributions, the KL directions swapped. Both from the same similarities, against independent computations."""
    g = torch.Generator().manual_seed(7)
    text = torch.nn.functional.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    adv, orig, clean = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    s = lambda f: torch.nn.functional.normalize(f, dim=-1) @ text.t()  # noqa: E731  (5, 4) cosine similarities
    p = lambda f: torch.softmax(100.0 * s(f), dim=-1)  # noqa: E731
    reg_logit = tecoa.tecoa_loss(s(adv), LABELS) + tecoa.logit_reg(adv, orig, clean, text)
    assert torch.allclose(reg_logit.double(), reference_ce(s(adv), LABELS) + reference_kl(p(adv), p(orig))
                          + reference_kl(p(adv), p(clean)), rtol=1e-4)
    pmg = tecoa.pmg_loss(s(adv), s(orig), s(clean), LABELS)
    assert torch.allclose(pmg.double(), reference_ce(s(adv), LABELS) + reference_kl(p(orig), p(adv))
                          + reference_kl(p(clean), p(adv)), rtol=1e-4)
    assert abs(reg_logit.item() - pmg.item()) > 1e-3  # not the same loss


def test_the_regularisers_are_advflyps_own():
    """tecoa.py keeps its own copy of AdvFLYP's L_logit and L_feat (so that it reads alone): the same values and the
    same gradients as advflyp.py's (the same operations in the same order, so exactly)."""
    import advflyp
    g = torch.Generator().manual_seed(3)
    text = torch.randn(7, 6, generator=g)
    adv, orig, clean = (torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(3))
    for mine, theirs in ((lambda: tecoa.logit_reg(adv, orig, clean, text, 30.0),
                          lambda: advflyp.logit_reg(adv, orig, clean, text, 30.0)),
                         (lambda: tecoa.feature_reg(adv, orig, clean), lambda: advflyp.feature_reg(adv, orig, clean))):
        a, b = mine(), theirs()
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(a, [adv, clean]),
                                                     torch.autograd.grad(b, [adv, clean])))


@pytest.mark.slow
def test_reg_flag_runs_tecoa_with_advflyps_regularisers(tiny_ckpt, tmp_path):
    """--reg full: at step 1 f_θ = f_orig, so the term (ii)s are 0 and TeCoA's loss is the same; what --reg adds is
    L_logit + L_feat's term (i) on x_adv against x, positive."""
    reg_records, _ = tiny_run(tiny_ckpt, tmp_path / "reg", "--reg", "full", "--max-steps", "1")
    tecoa_records, _ = tiny_run(tiny_ckpt, tmp_path / "tecoa", "--max-steps", "1")
    assert reg_records[0]["loss"] - tecoa_records[0]["loss"] > 0
    assert tecoa.parse_args(["--data", "synthetic", "--reg", "feat"]).method == "tecoa"


def test_pmg_flag_names_the_method():
    assert tecoa.parse_args(["--data", "demo"]).method == "tecoa"
    args = tecoa.parse_args(["--demo", "--pmg"])
    assert args.method == "pmg-aft" and args.out.startswith(os.path.join("runs", "pmg-aft-"))
    assert (args.lr, args.model) == (1e-3, "demo")
    defaults = tecoa.parse_args(["--data", "synthetic"])
    assert (defaults.lr, defaults.batch_size, defaults.epochs, defaults.eps, defaults.alpha, defaults.warmup,
            defaults.momentum, defaults.attack_steps) == (1e-5, 256, 10, 1.0, 1.0, 1000, 0.9, 2)


# ------------------------------------------------------------------------------------------ attention and loss
def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of 1-D bilinear resampling with half-pixel centres (align_corners=False), derived by
    hand: output pixel i samples the input at (i + 0.5) · n_in / n_out − 0.5, clamped to the first pixel."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w = src - lo
        m[i, lo] += 1 - w
        m[i, hi] += w
    return torch.tensor(m)


def reference_attention(tokens, text, labels, size):
    """The official code's map, one image at a time in float64: each feature divided by its root-sum-of-squares over
    the tokens (class token included), patch scores against the own class's text, min-max, bilinear upsampling as a
    product with the hand-derived resampling matrices."""
    tokens, text = tokens.double(), text.double()
    n = tokens.shape[1]
    side = int(round((n - 1) ** 0.5))
    resample = bilinear_matrix(side, size)
    maps = []
    for i, y in enumerate(labels.tolist()):
        feats = tokens[i]  # (1+P, D)
        feats = feats / torch.sqrt((feats ** 2).sum(0))  # each feature column over the 1+P tokens
        scores = feats[1:] @ text[y]  # (P,)
        scores = (scores - scores.min()) / (scores.max() - scores.min())
        grid = scores.reshape(side, side)  # row-major: patch j is at row j // side, column j % side
        maps.append((resample @ grid @ resample.t()).reshape(-1))
    return torch.stack(maps)


def random_tokens(seed, b=3, side=3, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + side * side, d, generator=g, dtype=torch.float64)


def unit_text(seed, c=4, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=-1)


ATT_LABELS = torch.tensor([2, 0, 2])


@pytest.mark.parametrize("size", [7, 12])
def test_text_guided_attention_matches_the_loop_reference_value_and_gradient(size):
    tokens, text = random_tokens(0).requires_grad_(True), unit_text(1)
    mine = tecoa.text_guided_attention(tokens.float(), text.float(), ATT_LABELS, size)
    ref = reference_attention(tokens, text, ATT_LABELS, size)
    assert mine.shape == (3, size * size) and mine.dtype == torch.float32
    torch.testing.assert_close(mine.double(), ref, rtol=1e-5, atol=1e-6)
    assert mine.min() >= 0 and mine.max() <= 1
    weights = torch.randn(3, size * size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g_mine, = torch.autograd.grad((tecoa.text_guided_attention(tokens, text, ATT_LABELS, size) * weights).sum(),
                                  tokens)
    g_ref, = torch.autograd.grad((reference_attention(tokens, text, ATT_LABELS, size) * weights).sum(), tokens)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-9, atol=1e-12)
    # and against finite differences (away from ties of the min and max; random projections of the Jacobian)
    assert torch.autograd.gradcheck(lambda t: tecoa.text_guided_attention(t, text, ATT_LABELS, size),
                                    (random_tokens(3).requires_grad_(True),), fast_mode=True)


def test_text_guided_attention_normalises_along_the_token_axis_and_uses_the_own_class():
    tokens, text = random_tokens(4), unit_text(5)
    mine = tecoa.text_guided_attention(tokens, text, ATT_LABELS, 6)
    # the official code's token-axis normalisation is not the usual per-token one, and it changes the map
    per_token = torch.nn.functional.normalize(tokens, dim=-1)
    scores = torch.einsum("bpd,bd->bp", per_token[:, 1:], text[ATT_LABELS])
    assert not torch.allclose(mine, tecoa.text_guided_attention(per_token, text, ATT_LABELS, 6))
    # changing the class token moves the token-axis norms, hence the map (it would not with per-token norms)
    moved = tokens.clone()
    moved[:, 0] *= 5
    assert not torch.allclose(mine, tecoa.text_guided_attention(moved, text, ATT_LABELS, 6))
    assert scores.shape == (3, 9)
    # a positive scale of the text (the official code passes 100 · t in one version) leaves the map unchanged
    torch.testing.assert_close(mine, tecoa.text_guided_attention(tokens, 100 * text, ATT_LABELS, 6))
    # each image is scored against its own class's prompt
    other = tecoa.text_guided_attention(tokens, text, torch.tensor([1, 0, 2]), 6)
    assert not torch.allclose(mine[0], other[0]) and torch.equal(mine[1:], other[1:])
    # at the patch resolution the map is the min-max scores themselves: 0 at the lowest patch, 1 at the highest
    exact = tecoa.text_guided_attention(tokens, text, ATT_LABELS, 3)
    assert torch.equal(exact.min(1).values, torch.zeros(3)) and torch.equal(exact.max(1).values, torch.ones(3))
    # computed in fp32 under bf16 autocast too (bf16 token embeddings are promoted, not the map demoted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tecoa.text_guided_attention(tokens.float(), text.float(), ATT_LABELS, 6)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, tecoa.text_guided_attention(tokens.float(), text.float(), ATT_LABELS, 6))
    assert tecoa.text_guided_attention(tokens.bfloat16(), text, ATT_LABELS, 6).dtype == torch.float32
    # a constant score map gives a zero map, not NaN
    flat = torch.ones(1, 10, 6, dtype=torch.float64)
    assert torch.equal(tecoa.text_guided_attention(flat, text, torch.tensor([0]), 4), torch.zeros(1, 16,
                                                                                                  dtype=torch.float64))


def test_text_guided_attention_rejects_a_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        tecoa.text_guided_attention(torch.randn(2, 1 + 6, 4), unit_text(0, d=4), torch.tensor([0, 1]), 8)


def reference_tga(adv_sim, labels, att_adv, att_clean, att_orig, alpha=0.08, beta=0.05, scale=100.0):
    """CE from probabilities plus the two distances as square roots of sums of squares, per image in a loop."""
    p = torch.exp(scale * adv_sim) / torch.exp(scale * adv_sim).sum(-1, keepdim=True)
    ce = -torch.log(p[torch.arange(len(labels)), labels]).mean()
    dist = lambda a: torch.stack([torch.sqrt(((a[i] - att_orig[i]) ** 2).sum())  # noqa: E731
                                  for i in range(len(a))]).mean()
    return ce + alpha * dist(att_adv) + beta * dist(att_clean)


def test_tga_loss_matches_the_reference_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    adv_sim = (0.15 + 0.2 * torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    att_adv, att_clean, att_orig = (torch.rand(3, 25, generator=g, dtype=torch.float64).requires_grad_(True)
                                    for _ in range(3))
    for weights in ({}, {"alpha": 0.5, "beta": 2.0}):
        loss = tecoa.tga_loss(adv_sim, ATT_LABELS, att_adv, att_clean, att_orig, **weights)
        ref = reference_tga(adv_sim, ATT_LABELS, att_adv, att_clean, att_orig, **weights)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
        mine = torch.autograd.grad(loss, [adv_sim, att_adv, att_clean])
        theirs = torch.autograd.grad(ref, [adv_sim, att_adv, att_clean])
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)
    # the weights sit on the right terms: 0.08 on the adversarial map, 0.05 on the clean one (official code)
    base = tecoa.tecoa_loss(adv_sim, ATT_LABELS)
    only_adv = tecoa.tga_loss(adv_sim, ATT_LABELS, att_adv, att_orig, att_orig) - base
    only_clean = tecoa.tga_loss(adv_sim, ATT_LABELS, att_orig, att_clean, att_orig) - base
    norm = lambda a: (a - att_orig).norm(dim=1).mean()  # noqa: E731
    torch.testing.assert_close(only_adv, 0.08 * norm(att_adv), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(only_clean, 0.05 * norm(att_clean), rtol=1e-12, atol=1e-12)
    # the original model's map is a constant; equal maps give TeCoA's loss and a zero (not NaN) gradient
    g_orig, = torch.autograd.grad(tecoa.tga_loss(adv_sim, ATT_LABELS, att_adv, att_clean, att_orig), [att_orig],
                                  allow_unused=True)
    assert g_orig is None or g_orig.abs().max() == 0
    same = att_orig.detach().clone().requires_grad_(True)
    loss = tecoa.tga_loss(adv_sim, ATT_LABELS, same, same, att_orig)
    assert loss.item() == base.item()
    g_same, = torch.autograd.grad(loss, [same])
    assert torch.equal(g_same, torch.zeros_like(same))


def test_tga_form_agft_is_the_agft_authors_loss():
    """--tga-form agft: the AGFT authors' TGA-ZSR (their train.py): 0.05 on the adversarial term, 0.08 on the clean
    one, each the norm over dim 1 of (B, 1, R, R) maps, i.e. |a − b| per pixel, averaged over pixels and images;
    against that computation written out, value and gradient. A flag of --tga alone; older runs resume as official."""
    g = torch.Generator().manual_seed(1)
    adv_sim = (0.15 + 0.2 * torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    att_adv, att_clean, att_orig = (torch.rand(3, 25, generator=g, dtype=torch.float64).requires_grad_(True)
                                    for _ in range(3))
    alpha, beta, distance = tecoa.TGA_FORMS["agft"]
    loss = tecoa.tga_loss(adv_sim, ATT_LABELS, att_adv, att_clean, att_orig, alpha, beta, distance=distance)
    maps = lambda a: a.view(3, 1, 5, 5)  # noqa: E731
    orig = maps(att_orig.detach())
    ref = (tecoa.tecoa_loss(adv_sim, ATT_LABELS) + 0.05 * torch.norm(maps(att_adv) - orig, dim=1).mean()
           + 0.08 * torch.norm(maps(att_clean) - orig, dim=1).mean())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, [att_adv, att_clean]), torch.autograd.grad(ref, [att_adv, att_clean])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert tecoa.parse_args(["--data", "synthetic", "--tga", "--tga-form", "agft"]).tga_form == "agft"
    with pytest.raises(common.UsageError, match="--tga-form agft: only with --tga"):
        tecoa.parse_args(["--data", "synthetic", "--tga-form", "agft"])
    assert common.ADDED_FLAGS["tga_form"] == "official"


def test_tga_flag_names_the_method_and_sets_its_learning_rate():
    args = tecoa.parse_args(["--data", "synthetic", "--tga"])
    assert (args.method, args.lr, args.tga, args.pmg) == ("tga-zsr", 4e-5, True, False)
    assert (args.batch_size, args.epochs, args.eps, args.alpha, args.warmup, args.momentum, args.attack_steps) == \
        (256, 10, 1.0, 1.0, 1000, 0.9, 2)
    assert tecoa.parse_args(["--data", "synthetic"]).lr == 1e-5
    assert tecoa.parse_args(["--data", "synthetic", "--tga", "--lr", "3e-5"]).lr == 3e-5
    demo = tecoa.parse_args(["--demo", "--tga"])
    assert demo.method == "tga-zsr" and demo.out.startswith(os.path.join("runs", "tga-zsr-")) and demo.lr == 1e-3


# ------------------------------------------------------------------------------------------- in a real run
def tiny_run(tiny_ckpt, out, *flags, lr="0.01"):
    """tecoa.main on 24 synthetic images in batches of 4 for 2 epochs (12 steps), in this process."""
    tecoa.main([*flags, "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "24", "--batch-size", "4",
                "--epochs", "2", "--lr", lr, "--warmup", "1", "--eps", "4", "--workers", "0", "--log-every", "1",
                "--out", str(out)])
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return records, load_weights(os.path.join(out, "last.pt"))


def test_pmg_terms_act(tiny_ckpt, tmp_path):
    """PMG-AFT's KL terms change the trajectory: from the same start, data and attacks, TeCoA and PMG-AFT end apart."""
    _, plain = tiny_run(tiny_ckpt, tmp_path / "tecoa", "--max-steps", "4", lr="0.05")
    _, pmg = tiny_run(tiny_ckpt, tmp_path / "pmg", "--pmg", "--max-steps", "4", lr="0.05")
    assert max((plain[k] - pmg[k]).abs().max().item() for k in plain if k.startswith("visual.")) > 1e-5


def test_tga_attention_terms_act(tiny_ckpt, tmp_path):
    """At step 1 f_θ = f_orig and both runs attack the same CE from the same random start, so TeCoA's loss is the
    same and the clean map equals the original's: TGA-ZSR's first loss is TeCoA's + 0.08 · L_AR, with
    0 < L_AR <= ‖ones(32 · 32)‖ = 32 (maps in [0, 1])."""
    tga_records, _ = tiny_run(tiny_ckpt, tmp_path / "tga", "--tga", "--max-steps", "1")
    tecoa_records, _ = tiny_run(tiny_ckpt, tmp_path / "tecoa", "--max-steps", "1")
    assert 0 < tga_records[0]["loss"] - tecoa_records[0]["loss"] <= 0.08 * 32


def test_tga_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)  # a tiny CLIP with a ResNet image encoder (ModifiedResNet), saved like tiny_ckpt
    resnet = str(tmp_path / "resnet.pt")
    torch.save({"model": common.CLIP(64, 64, (1, 1, 1, 1), 16, None, 16, 49408, 64, 1, 1).state_dict()}, resnet)
    for flags, message in ((["--tga", "--model", resnet], "TGA-ZSR needs a ViT image encoder"),
                           (["--tga", "--pmg"], "--pmg, --tga and --reg: choose one"),
                           (["--pmg", "--reg", "logit"], "--pmg, --tga and --reg: choose one")):
        out = tmp_path / "out"
        code, _, stderr = run_main_in_process(tecoa.main, [*flags, "--data", "synthetic", "--out", str(out)], capsys)
        assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr and not out.exists()
