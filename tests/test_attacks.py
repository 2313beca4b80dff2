"""The evaluation attacks (attacks.py; docs/attacks.md): ε-ball and [0, 1] invariants, ε = 0, no gradient masking on a
trained model, APGD's checkpoints and best point, the DLR and margin losses against loops, AutoAttack's per-sample
worst case, the 2-class case, and independence from batching (what makes multi-process results exact)."""
import math
from fractions import Fraction

import pytest
import torch

import attacks
import common
import evaluate
from conftest import tiny_clip

ATTACK_NAMES = list(attacks.ATTACKS)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(clip_model, class_names):
    """logits_fn(x) = 100 · s(f(x), T) of `clip_model` for `class_names`, as zero_shot_eval builds it."""
    clip_model.requires_grad_(False)
    encoder = common.ImageEncoder(clip_model.visual).eval()
    text = common.text_features(clip_model, common.prompts_for(class_names), CPU)
    return encoder, text, lambda x: common.CLIP_LOGIT_SCALE * common.cosine_sim(encoder(x), text)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny CLIP over 5 classes and 6 images, some pixels exactly at 0 and 1 (where clamping binds)."""
    model = tiny_clip()
    encoder, text, logits_fn = classifier(model, [f"thing {i}" for i in range(5)])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    y = torch.randint(5, (6,), generator=g)
    return model, logits_fn, x, y, torch.arange(6)


@pytest.fixture(scope="module")
def demo():
    """The demo CLIP (pretrained, cached) on 32 held-out test images: a small trained model."""
    model = common.load_clip("demo")
    ds = common.DemoImages(common.DEMO_HELD_OUT, 2, 32, seed=2)
    _, _, logits_fn = classifier(model, ds.classes)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        clean = logits_fn(x)
    assert (clean.argmax(-1) == y).float().mean() > 0.8  # it is a trained model
    return logits_fn, x, y, torch.arange(len(y)), clean


# ------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_stays_in_eps_ball_and_unit_box(tiny, name):
    model, logits_fn, x, y, index = tiny
    x0 = x.clone()
    eps = 8 / 255
    x_adv = attacks.ATTACKS[name](logits_fn, x, y, index, eps, 2 / 255, 3, seed=0)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()  # it moved
    assert torch.equal(x, x0)  # the input is not modified in place
    assert all(p.grad is None for p in model.parameters())  # input gradients only


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_eps_zero_leaves_accuracy_at_clean(tiny, name):
    _, logits_fn, x, y, index = tiny
    x_adv = attacks.ATTACKS[name](logits_fn, x, y, index, 0.0, 1 / 255, 3, seed=0)
    assert torch.equal(x_adv, x)
    with torch.no_grad():
        assert torch.equal(logits_fn(x_adv).argmax(-1), logits_fn(x).argmax(-1))


# Table 6's transfer attacks are weaker white-box attacks by design: TI's 15 × 15 Gaussian smoothing makes the step
# low-frequency (a third of the 32 × 32 image), and NI's look-ahead x_t + α·g_t is not projected, so with α = 4/255
# and a consistent targeted gradient it lands far outside the ε-ball. Square is random search: 20 queries are nothing.
# DI-T: half of its gradients are taken through a random resize towards a random class; 3 of 32 images survived on
# one pretraining of the demo CLIP.
LARGE_EPS = {"ti": (20, 0.15), "ti-t": (20, 0.2), "ni-t": (20, 0.3), "di-t": (20, 0.15),
             "square": (1000, 0.07)}  # (steps, accuracy ≤)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_large_eps_breaks_a_trained_model(demo, name):
    """At ε = 32/255 every attack drives accuracy to about 0: the gradients are informative (no masking)."""
    logits_fn, x, y, index, clean = demo
    steps, bound = LARGE_EPS.get(name, (20, 0.07))
    x_adv = attacks.ATTACKS[name](logits_fn, x, y, index, 32 / 255, 4 / 255, steps, seed=0)
    with torch.no_grad():
        pred = logits_fn(x_adv).argmax(-1)
    assert (pred == y).float().mean() <= bound
    if name == "pgd-t-least":  # a targeted attack goes where it is sent, not just anywhere
        assert (pred == clean.argmin(-1)).float().mean() >= 0.3  # chance is 1/16
    if name in ("pgd-t-rand", "mi-t", "di-t"):  # the random wrong class, the same for every targeted attack
        target = (y + 1 + attacks.per_sample_randint(index, clean.shape[1] - 1, 0, CPU)) % clean.shape[1]
        assert (pred == target).float().mean() >= 0.5


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_does_not_depend_on_batching(tiny, name):
    """Per-sample random starts, targets and draws, per-sample APGD and Square state, and losses summed over the batch:
    a sample's x_adv is a function of its own image, label, dataset index and the seed, whatever batch it is in (and
    so whatever the number of processes), up to the float rounding of the batched forward.

    That rounding is not the same for a batch of 6 and of 1 (the CPU's vector units and blocking), on any CPU. It can
    flip the sign of a gradient entry that is within rounding of 0, which moves that one value by a multiple of α (seen
    on two machines: 1 value of 18,432 for DI-T, a few for TI and TI-T, whose smoothed gradients have many entries
    near 0), and, with a probability of about 1e-6 per decision, an APGD or Square decision between two losses that
    are within rounding of each other. So what holds on any machine is: at most 0.1% of the values differ (18 here),
    while a batch-dependent draw (the defect this test guards against) changes nearly all of them. Measured here:
    `differ` below is 0 to 2 values for every attack."""
    _, logits_fn, x, y, index = tiny
    whole = attacks.ATTACKS[name](logits_fn, x, y, index, 8 / 255, 2 / 255, 4, seed=3)
    parts = torch.cat([attacks.ATTACKS[name](logits_fn, x[s], y[s], index[s], 8 / 255, 2 / 255, 4, seed=3)
                       for s in (slice(0, 1), slice(1, 4), slice(4, 6))])
    differ = (whole - parts).abs() > 1e-6
    assert differ.float().mean() <= 1e-3, f"{int(differ.sum())} of {differ.numel()} values depend on the batch"
    other_seed = attacks.ATTACKS[name](logits_fn, x, y, index, 8 / 255, 2 / 255, 4, seed=4)
    if name in ("mi", "ni", "pi", "pi++"):  # no random start, no random draws (as in the papers and torchattacks):
        assert torch.equal(whole, other_seed)  # the same batch through the same ops, so the same rounding, bit for bit
    else:
        assert not torch.equal(whole, other_seed)  # the seed does reach the random choices


# --------------------------------------------------------------------------------------------------- losses
def test_margin_and_dlr_losses_match_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 7, generator=g) * 5
    y = torch.randint(7, (20,), generator=g)
    for i in range(20):
        z = logits[i].tolist()
        zy = z[y[i]]
        best_other = max(v for j, v in enumerate(z) if j != y[i])
        s = sorted(z, reverse=True)
        assert math.isclose(attacks.margin_loss(logits, y)[i].item(), best_other - zy, rel_tol=1e-5, abs_tol=1e-5)
        expected = -(zy - best_other) / (s[0] - s[2] + 1e-12)
        assert math.isclose(attacks.dlr_loss(logits, y)[i].item(), expected, rel_tol=1e-5, abs_tol=1e-6)
    # DLR is invariant to the logit scale and to a shift; positive exactly where the sample is misclassified
    assert torch.allclose(attacks.dlr_loss(3.7 * logits + 2.0, y), attacks.dlr_loss(logits, y), atol=1e-5)
    assert torch.equal(attacks.dlr_loss(logits, y) > 0, logits.argmax(-1) != y)
    with pytest.raises(ValueError):
        attacks.dlr_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------ APGD
def paper_checkpoints(n_iter):
    """w_j = ⌈p_j N⌉ with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), exact rationals."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(pj * n_iter) for pj in p})


def test_apgd_checkpoints_follow_the_paper():
    assert attacks.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]  # Croce & Hein 2020, §3.2
    for n in range(1, 301):
        assert attacks.apgd_checkpoints(n) == paper_checkpoints(n), n


def test_apgd_conditions():
    t, f = torch.tensor([True]), torch.tensor([False])
    cond = lambda n_up, window, f_max, f_ckpt, reduced: attacks.apgd_conditions(  # noqa: E731
        torch.tensor([float(n_up)]), window, torch.tensor([f_max]), torch.tensor([f_ckpt]), reduced).item()
    # Condition 1: fewer than ρ = 0.75 of the steps raised the loss (strictly fewer: 12 of 16 is not)
    assert cond(11, 16, 2.0, 1.0, f) and not cond(12, 16, 2.0, 1.0, f) and not cond(16, 16, 2.0, 1.0, f)
    # Condition 2: no progress since the last checkpoint and η was not halved there
    assert cond(16, 16, 1.0, 1.0, f) and not cond(16, 16, 1.0, 1.0, t)
    assert cond(0, 16, 1.0, 1.0, t)  # Condition 1 alone suffices


def test_apgd_returns_the_best_point():
    """Recording every point APGD evaluates: a sample that no iterate fooled gets its highest-loss iterate, a
    fooled sample gets a fooling iterate (the highest-loss one)."""
    torch.manual_seed(0)
    W = torch.randn(10, 3 * 8 * 8) * 0.3  # a linear 10-class model, so the loss landscape is simple to check
    seen = []

    def logits_fn(x):
        logits = x.flatten(1) @ W.t()
        seen.append((x.detach().clone(), logits.detach().clone()))
        return logits

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8, generator=g), torch.randint(10, (12,), generator=g)
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
    delta = common.per_sample_start(torch.arange(12), x.shape[1:], 2 / 255, 0, CPU)
    x_out = attacks.apgd(logits_fn, ce, x, y, 2 / 255, 15, delta)
    losses = torch.stack([ce(logits, y) for _, logits in seen])  # (iterates, B)
    fooled = torch.stack([logits.argmax(-1) != y for _, logits in seen])  # (iterates, B)
    assert len(seen) == 16  # x^(0) and 15 iterations
    out_logits = x_out.flatten(1) @ W.t()
    out_loss = ce(out_logits, y)
    for i in range(12):
        if fooled[:, i].any():
            assert out_logits[i].argmax() != y[i]
            assert torch.isclose(out_loss[i], losses[fooled[:, i], i].max(), atol=1e-5)
        else:
            assert torch.isclose(out_loss[i], losses[:, i].max(), atol=1e-5)
    assert fooled.any() and not fooled[:, :].all()  # the check above covers both kinds of samples


def reference_apgd(loss_fn, pred_fn, x, y, start, eps, n_iter, rho=0.75, alpha=0.75):
    """Algorithm 1 of Croce & Hein (2020) for one sample, with Python lists and scalars: the history of iterates
    X and losses L, checkpoint tests over the window [w_{j−1}, w_j], a restart overwriting X[w_j] with x_max."""
    P = lambda z: (x + (z - x).clamp(-eps, eps)).clamp(0, 1)  # noqa: E731

    def grad(z):
        z = z.clone().requires_grad_(True)
        g, = torch.autograd.grad(loss_fn(z, y), z)
        return g

    W = [w for w in paper_checkpoints(n_iter)[1:] if w < n_iter]
    X, L = [P(x + start)], []
    L.append(loss_fn(X[0], y).item())
    seen = [(X[0], L[0])]  # every evaluated point, for the output
    x_max, f_max, step = X[0], L[0], 2 * eps
    w_prev, reduced_prev, f_max_prev = 0, False, f_max
    for k in range(n_iter):
        z = P(X[k] + step * grad(X[k]).sign())
        X.append(z if k == 0 else P(X[k] + alpha * (z - X[k]) + (1 - alpha) * (X[k] - X[k - 1])))
        L.append(loss_fn(X[-1], y).item())
        seen.append((X[-1], L[-1]))
        if L[-1] > f_max:
            x_max, f_max = X[-1], L[-1]
        if k + 1 in W:
            w = k + 1
            rises = sum(L[i + 1] > L[i] for i in range(w_prev, w))
            reduce = rises < rho * (w - w_prev) or (not reduced_prev and f_max == f_max_prev)
            if reduce:
                step /= 2
                X[w], L[w] = x_max, f_max
            w_prev, reduced_prev, f_max_prev = w, reduce, f_max
    fooling = [(z, f) for z, f in seen if pred_fn(z) != y]
    candidates = fooling or seen
    return max(candidates, key=lambda zf: zf[1])[0]  # max keeps the first of equal losses, as strict > does


@pytest.mark.parametrize("n_iter", [30, 100])  # 30: checkpoints 7, 13, 18, 21, ...; 100: a window where ρ·16 = 12
def test_apgd_matches_a_per_sample_reference(n_iter):
    """The batched APGD (per-sample tensors) against Algorithm 1 run one sample at a time."""
    torch.manual_seed(1)
    W = torch.randn(10, 3 * 8 * 8) * 0.3
    logits_fn = lambda x: x.flatten(1) @ W.t()  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 3, 8, 8, generator=g), torch.randint(10, (8,), generator=g)
    eps = 3 / 255
    delta = common.per_sample_start(torch.arange(8), x.shape[1:], eps, 0, CPU)
    for loss in (attacks.cross_entropy_per_sample, attacks.dlr_loss):
        batched = attacks.apgd(logits_fn, loss, x, y, eps, n_iter, delta)
        for i in range(8):
            one = reference_apgd(lambda z, t: loss(logits_fn(z[None]), t[None])[0],
                                 lambda z: logits_fn(z[None]).argmax(), x[i], y[i], delta[i], eps, n_iter)
            assert torch.allclose(batched[i], one, atol=1e-6), (loss.__name__, i)


def test_apgd_ce_makes_progress_on_confident_samples(demo):
    """At CLIP's scale 100 the trained model's CE is exactly 0 in float32 for most samples; the loss APGD-CE
    tracks must still see the margin shrink, or every checkpoint would send it back to its start."""
    logits_fn, x, y, index, clean = demo
    ce = attacks.cross_entropy_per_sample
    reference = torch.nn.functional.cross_entropy(clean, y, reduction="none")
    assert (reference == 0).float().mean() > 0.5  # the situation this guards against
    assert (ce(clean, y) > 0).all()
    assert torch.allclose(ce(clean, y)[reference > 1e-3], reference[reference > 1e-3], rtol=1e-4)
    delta = common.per_sample_start(index, x.shape[1:], 2 / 255, 0, CPU)
    x_out = attacks.apgd(logits_fn, ce, x, y, 2 / 255, 10, delta)
    with torch.no_grad():
        start, end = ce(logits_fn((x + delta).clamp(0, 1)), y), ce(logits_fn(x_out), y)
    assert (end >= start).all() and (end > 2 * start).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------ AutoAttack
@pytest.mark.parametrize("combined,first,second", [("aa", "apgd-ce", "apgd-dlr"), ("aa-ce-t", "apgd-ce", "apgd-t")])
def test_combined_attack_is_the_per_sample_worst_case(demo, combined, first, second):
    """AutoAttack's combination (the AGFT paper's aa, RobustVLM's aa-ce-t): the second attack runs on the images the
    first left correctly classified, so an image is robust iff both attacks fail on it. Compared bit for bit with
    the two attacks run by hand on those same batches (the whole batch, then its survivors): the same inputs through
    the same ops round the same way. (The second attack on the whole batch would round differently: see
    test_attack_does_not_depend_on_batching.)"""
    logits_fn, x, y, index, clean = demo
    args = (4 / 255, 1 / 255, 3, 0)

    def correct(x_adv):
        with torch.no_grad():
            return logits_fn(x_adv).argmax(-1) == y  # (B,)
    x_first = attacks.ATTACKS[first](logits_fn, x, y, index, *args)
    alive = correct(x_first)
    expected = x_first.clone()
    expected[alive] = attacks.ATTACKS[second](logits_fn, x[alive], y[alive], index[alive], *args)
    x_adv = attacks.ATTACKS[combined](logits_fn, x, y, index, *args)
    assert torch.equal(x_adv, expected)
    assert alive.any() and not alive.all() and (expected != x_first)[alive].any()  # both parts had work to do
    # below the second attack's number of classes (DLR: 3, APGD-T: 4) the combination is the first attack alone
    two = lambda z: logits_fn(z)[:, :2]  # noqa: E731
    keep = y < 2
    assert torch.equal(attacks.ATTACKS[combined](two, x[keep], y[keep], index[keep], *args),
                       attacks.ATTACKS[first](two, x[keep], y[keep], index[keep], *args))


def test_two_classes_dlr_not_applicable_and_aa_is_apgd_ce():
    model = tiny_clip(1)
    encoder, text, logits_fn = classifier(model, ["cat", "dog"])
    ds = common.SyntheticImages(9, 2, 32, seed=0)
    dist = common.Dist(0, 1, 0, CPU)
    r = evaluate.zero_shot_eval(encoder, text, ds, dist, ("apgd-ce", "apgd-dlr", "aa"), 8 / 255, 1 / 255, 3,
                              batch_size=4)
    assert r["apgd-dlr"] is None and r["aa"] == r["apgd-ce"] and r["n"] == 9
    x = torch.stack([ds[i][0] for i in range(9)])
    y = torch.tensor([ds[i][1] for i in range(9)])
    a = attacks.ATTACKS["aa"](logits_fn, x, y, torch.arange(9), 8 / 255, 1 / 255, 3, 0)
    b = attacks.ATTACKS["apgd-ce"](logits_fn, x, y, torch.arange(9), 8 / 255, 1 / 255, 3, 0)
    assert torch.equal(a, b)


def test_zero_shot_eval_robust_never_above_clean(tiny):
    """Only clean-correct samples count as robust, so every robust accuracy is ≤ clean, also for a random model
    (where an attack can push a wrong prediction onto the label)."""
    model, _, _, _, _ = tiny
    encoder, text, _ = classifier(model, [f"thing {i}" for i in range(5)])
    ds = common.SyntheticImages(11, 5, 32, seed=1)
    r = evaluate.zero_shot_eval(encoder, text, ds, common.Dist(0, 1, 0, CPU), tuple(ATTACK_NAMES), 8 / 255, 2 / 255,
                              2, batch_size=4)
    assert r["n"] == 11
    assert all(r[name] <= r["clean"] for name in ATTACK_NAMES)


def test_random_targets_are_wrong_classes_and_fixed_per_index():
    index = torch.arange(1000)
    offsets = attacks.per_sample_randint(index, 9, seed=0, device=CPU)
    assert offsets.min() >= 0 and offsets.max() <= 8 and len(offsets.unique()) == 9  # y + 1 + [0, C−2]: never y
    counts = torch.bincount(offsets, minlength=9).float()
    assert counts.min() > 70  # about uniform (1000 / 9 ≈ 111 each)
    assert torch.equal(attacks.per_sample_randint(index[500:510].flip(0), 9, 0, CPU), offsets[500:510].flip(0))
    assert not torch.equal(attacks.per_sample_randint(index, 9, 1, CPU), offsets)
