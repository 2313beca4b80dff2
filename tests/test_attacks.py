"""The evaluation attacks (attacks.py; docs/attacks.md): ε-ball and [0, 1] invariants, ε = 0, no gradient masking on a
trained model, APGD's checkpoints and best point, the DLR and margin losses against loops, AutoAttack's per-sample
worst case, the 2-class case, independence from batching; then Table 6's attacks, APGD-T and Square against
torchattacks 3.5.1, exactly where the algorithms coincide and statistically where only the random draws differ."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torchattacks

import attack_speed  # benchmarks/, on pytest's path (pytest.ini)
import attacks
import common
import evaluate
from conftest import demo_zero_shot, tiny_clip, zero_shot_eval

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
             "square": (1000, 0.07), "square-aa": (1000, 0.07)}  # (steps, accuracy ≤)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("square") else n
                                  for n in ATTACK_NAMES])  # Square's 5000 queries: the whole suite's
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
def reference_checkpoints(n_iter):
    """The reference code's loop (AutoAttack's and torchattacks' APGD): a check whenever `counter3 == k`, after which k
    shrinks by size_decr down to n_iter_min; the iterations (counted from 1) after which it checks."""
    k, size_decr, n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, counter3 = [0], 0
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            points.append(i + 1)
            counter3, k = 0, max(k - size_decr, n_iter_min)
    return points


def test_apgd_checkpoints_follow_the_reference_code():
    assert attacks.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]  # = the paper's ⌈p_j N⌉ at N = 100
    assert attacks.apgd_checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # the AGFT code's AA-10 (paper: 3, 5, 6..)
    assert attacks.apgd_checkpoints(20) == [0, 4, 7, 9, *range(10, 21)]  # (paper: 5, 9, 12, 14, 16, 18, 20)
    for n in range(1, 301):
        assert attacks.apgd_checkpoints(n) == reference_checkpoints(n), n


def test_apgd_conditions():
    t, f = torch.tensor([True]), torch.tensor([False])
    cond = lambda n_up, window, f_max, f_ckpt, reduced: attacks.apgd_conditions(  # noqa: E731
        torch.tensor([float(n_up)]), window, torch.tensor([f_max]), torch.tensor([f_ckpt]), reduced).item()
    # Condition 1: at most ρ = 0.75 of the steps raised the loss (the reference's `t <= k * k3`: 12 of 16 is)
    assert cond(12, 16, 2.0, 1.0, f) and not cond(13, 16, 2.0, 1.0, f) and not cond(16, 16, 2.0, 1.0, f)
    # Condition 2: no progress since the last checkpoint and η was not halved there
    assert cond(16, 16, 1.0, 1.0, f) and not cond(16, 16, 1.0, 1.0, t) and not cond(16, 16, 2.0, 1.0, f)
    assert cond(0, 16, 1.0, 1.0, t)  # Condition 1 alone suffices


def recording_linear_model():
    """A linear 10-class model on 3 × 8 × 8 images, so the loss landscape is simple to check: (W, seen, logits_fn),
    logits_fn appending each (x, logits) it computes to `seen`."""
    torch.manual_seed(0)
    W = torch.randn(10, 3 * 8 * 8) * 0.3
    seen = []

    def logits_fn(x):
        logits = x.flatten(1) @ W.t()
        seen.append((x.detach().clone(), logits.detach().clone()))
        return logits
    return W, seen, logits_fn


def test_apgd_returns_the_best_point():
    """Recording every point APGD evaluates, without early exit: a sample that no iterate fooled gets its highest-loss
    iterate, a fooled sample gets a fooling iterate (the highest-loss one)."""
    W, seen, logits_fn = recording_linear_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8, generator=g), torch.randint(10, (12,), generator=g)
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
    delta = common.per_sample_start(torch.arange(12), x.shape[1:], 2 / 255, 0, CPU)
    with attacks.early_exit(False):
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


def test_apgd_early_exit_drops_a_sample_at_its_first_fooling_iterate():
    """With early exit (the default) a sample leaves the batch at the iterate that first fools the model and returns
    that iterate; no later forward sees it; the others run as before (linear model: rows round alike in any batch)."""
    W, seen, logits_fn = recording_linear_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 8, 8, generator=g)
    y = (x.flatten(1) @ W.t()).argmax(-1)  # every sample classified correctly at first
    ce = lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none")  # noqa: E731
    eps = 5 / 255
    delta = common.per_sample_start(torch.arange(12), x.shape[1:], eps, 0, CPU)
    with attacks.early_exit(False):
        x_full = attacks.apgd(logits_fn, ce, x, y, eps, 15, delta)
    full = seen[:]
    fooled = torch.stack([logits.argmax(-1) != y for _, logits in full])  # (16 iterates, 12)
    first = [int(fooled[:, i].nonzero()[0]) if fooled[:, i].any() else None for i in range(12)]
    seen.clear()
    x_early = attacks.apgd(logits_fn, ce, x, y, eps, 15, delta)
    sizes = [len(z) for z, _ in seen]
    assert sizes == [sum(f is None or f >= k for f in first) for k in range(len(sizes))]  # who is still attacked
    assert len(seen) == len(full) and sizes[0] == 12 and min(sizes) < 12  # the survivors run every iteration
    for i in range(12):
        if first[i] is None:  # never fooled: the same trajectory, the same best point, bit for bit
            assert torch.equal(x_early[i], x_full[i])
        else:  # the first fooling iterate, the one the full run evaluated at that iteration
            assert torch.equal(x_early[i], full[first[i]][0][i])
            assert (x_early[i].flatten() @ W.t()).argmax() != y[i]
    assert any(f is None for f in first) and any(f is not None and f > 0 for f in first), first


class PerImage:
    """logits_fn computed one image at a time: each image rounds the same whatever batch it is in, so two runs that
    give an image the same inputs give it the same outputs, bit for bit (see test_attack_does_not_depend_on_batching
    for what batching itself changes). Counts the images it is called on."""

    def __init__(self, logits_fn):
        self.logits_fn, self.images = logits_fn, 0

    def __call__(self, x):
        self.images += len(x)
        return torch.cat([self.logits_fn(x[i:i + 1]) for i in range(len(x))])


EARLY_EXIT_ATTACKS = ["apgd-ce", "apgd-dlr", "aa"] + [pytest.param(name, marks=pytest.mark.slow)  # 5 to 15 s each
                                                       for name in ("apgd-ce-x5", "apgd-t", "aa-ce-t")]


@pytest.mark.parametrize("name", EARLY_EXIT_ATTACKS)
def test_early_exit_leaves_every_per_image_result_unchanged(demo, name):
    """The APGD family with and without early exit, at batch sizes 8, 3 and 1, through a forward that rounds each
    image alike in any batch (PerImage): the same images robust, bit for bit; an image never fooled gets the same x_adv
    bit for bit (its whole trajectory is the same); with fewer forwards. ε = 2/255: on the demo CLIP some images
    survive and most are fooled early. aa-ce-t at 8 and 1 only: its parts run at 3 on their own (its 14 APGD runs made
    it the slowest of these, 15 s)."""
    logits_fn, x, y, index, clean = demo
    x, y, index = x[:8], y[:8], index[:8]
    eps, steps = 2 / 255, 6
    results = {}
    for early in (True, False):
        for batch in (8, 1) if name == "aa-ce-t" else (8, 3, 1):
            f = PerImage(logits_fn)
            with attacks.early_exit(early):
                x_adv = torch.cat([attacks.run_attack(name, f, x[s:s + batch], y[s:s + batch], index[s:s + batch],
                                                      eps, 1 / 255, steps, 0, {}) for s in range(0, len(x), batch)])
            robust = logits_fn(x_adv).argmax(-1) == y
            results[early, batch] = robust, x_adv, f.images
    robust, x_adv, cost = results[False, 8]
    assert 0 < int(robust.sum()) < len(y)  # both kinds of images
    for (early, batch), (r, xa, c) in results.items():
        assert torch.equal(r, robust), (early, batch)
        assert torch.equal(xa[robust], x_adv[robust]), (early, batch)
        if early:
            assert c < cost
        else:
            assert c == cost


@pytest.mark.parametrize("n_iter", [10, 20, 100])
@pytest.mark.parametrize("loss", ["ce", "dlr", "our-ce"])
def test_apgd_is_torchattacks_apgd_given_the_same_start(loss, n_iter):
    """Our APGD against torchattacks 3.5.1's (the code the AGFT evaluation runs), started at the same point: the same
    best point x_best, bit for bit (the same batch and the same ops; its random start ε·t/max|t| handed over). The
    checkpoints at N = 10 and 20, where they differ from the paper's, and both conditions are exercised (random linear
    classifier, ε = 8/255: many steps without a rise, restarts). our-ce: the benchmark's --peer-stable-ce, which hands
    torchattacks our cancellation-free CE, makes its APGD-CE ours."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    g = torch.Generator().manual_seed(1)
    x, y, eps = torch.rand(16, 3, 8, 8, generator=g), torch.randint(10, (16,), generator=g), 8 / 255
    t = 2 * torch.rand(x.shape, generator=g) - 1
    delta = eps * torch.ones([x.shape[0], 1, 1, 1]) * t / t.reshape([t.shape[0], -1]).abs().max(dim=1, keepdim=True)[
        0].reshape([-1, 1, 1, 1])  # torchattacks' start, written as it computes it
    reference = torchattacks.APGD(model, norm="Linf", eps=eps, steps=n_iter, n_restarts=1, loss=loss[-3:])
    if loss == "our-ce":
        attack_speed.with_our_ce(reference)
    rand = torch.rand
    torch.rand = lambda *a, **k: (t + 1) / 2  # its one draw: t = 2 · rand − 1
    try:
        x_best, _, _, _ = reference.attack_single_run(x, y)
    finally:
        torch.rand = rand
    loss_of_logits = {"ce": lambda z, c: torch.nn.functional.cross_entropy(z, c, reduction="none"),  # torchattacks'
                      "dlr": attacks.dlr_loss, "our-ce": attacks.cross_entropy_per_sample}[loss]  # its DLR is ours
    ours = attacks.apgd(model.requires_grad_(False), loss_of_logits, x, y, eps, n_iter, delta, best_loss=True)
    assert torch.equal(ours, x_best)
    assert (ours != (x + delta).clamp(0, 1)).any()


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
@pytest.mark.parametrize("combined,first,second", [("aa", "apgd-ce", "apgd-dlr"), ("aa-ce-t", "apgd-ce-x5", "apgd-t")])
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


def test_apgd_ce_x5_restarts_on_the_survivors_from_fresh_starts(demo):
    """RobustVLM's APGD-CE (auto-attack's custom version keeps 5 restarts): restart r starts from the r-th per-image
    random start and attacks only the images no earlier restart fooled; the first restart is apgd-ce itself. Compared
    bit for bit with the restarts run by hand on the same batches."""
    logits_fn, x, y, index, clean = demo
    eps, steps = 3 / 255, 3

    def correct(x_adv):
        with torch.no_grad():
            return logits_fn(x_adv).argmax(-1) == y
    x_adv, alive, robust = x.clone(), torch.arange(len(x)), []
    for r in range(5):
        delta = common.per_sample_start(index[alive], x.shape[1:], eps, 0, CPU, restart=r)
        x_adv[alive] = attacks.apgd(logits_fn, attacks.cross_entropy_per_sample, x[alive], y[alive], eps, steps,
                                    delta)
        robust.append(int(correct(x_adv).sum()))
        with torch.no_grad():
            alive = alive[logits_fn(x_adv[alive]).argmax(-1) == y[alive]]  # the survivors, in the same batch
        if r == 0:
            assert torch.equal(x_adv, attacks.ATTACKS["apgd-ce"](logits_fn, x, y, index, eps, 1 / 255, steps, 0))
    assert torch.equal(attacks.ATTACKS["apgd-ce-x5"](logits_fn, x, y, index, eps, 1 / 255, steps, 0), x_adv)
    assert robust == sorted(robust, reverse=True)  # a restart can only fool more (here, at 3 steps, none did)
    assert not torch.equal(common.per_sample_start(index, x.shape[1:], eps, 0, CPU, restart=1),
                           common.per_sample_start(index, x.shape[1:], eps, 0, CPU))


def test_stable_ce_keeps_the_true_class_in_the_gradient(demo):
    """--stable-ce (common.STABLE_CE): the same cross-entropy where float32 resolves it, and, for a confident image
    at scale 100, a gradient whose true-class entry is e^-margin instead of the reference's exact 0 (p_y rounds to
    1), so that PGD pushes the true class down as well as the others up. Off, attack_cross_entropy is
    F.cross_entropy exactly (the papers' numbers)."""
    logits_fn, x, y, index, clean = demo
    logits = clean.clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    confident = reference == 0
    assert confident.float().mean() > 0.5
    assert torch.equal(common.attack_cross_entropy(logits, y),
                       torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    grad_ref, = torch.autograd.grad(common.attack_cross_entropy(logits, y), logits)
    token = common.STABLE_CE.set(True)
    try:
        value = common.attack_cross_entropy(logits, y)
        grad, = torch.autograd.grad(value, logits)
    finally:
        common.STABLE_CE.reset(token)
    torch.testing.assert_close(value, common.cross_entropy_per_sample(clean, y).sum())
    true_ref, true = grad_ref.gather(1, y[:, None])[:, 0], grad.gather(1, y[:, None])[:, 0]  # ∂/∂z_y
    assert (true_ref[confident] == 0).all() and (true[confident] < 0).all()
    margin = clean.gather(1, y[:, None])[:, 0] - clean.scatter(1, y[:, None], float("-inf")).amax(1)
    c = confident & (margin < 80)  # e^-margin in float32's normal range
    assert ((true[c].abs().log() + margin[c]).abs() < 0.7 + math.log(clean.shape[1])).all()  # e^-margin up to C


def test_two_classes_dlr_not_applicable_and_aa_is_apgd_ce():
    model = tiny_clip(1)
    encoder, text, logits_fn = classifier(model, ["cat", "dog"])
    ds = common.SyntheticImages(9, 2, 32, seed=0)
    dist = common.Dist(0, 1, 0, CPU)
    r = zero_shot_eval(encoder, text, ds, dist, ("apgd-ce", "apgd-dlr", "aa"), 8 / 255, 1 / 255, 3,
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
    r = zero_shot_eval(encoder, text, ds, common.Dist(0, 1, 0, CPU), tuple(ATTACK_NAMES), 8 / 255, 2 / 255,
                              2, batch_size=4)
    assert r["n"] == 11
    assert all(r[name] <= r["clean"] for name in ATTACK_NAMES)


def test_each_kind_of_random_draw_has_numbers_of_its_own():
    """torch's generators keep only the low 32 bits of a seed, so streams told apart above bit 32 would share their
    numbers (they did: Square's squares repeated its stripes' draws, targets and DI's transforms the random start's).
    Every stream, and every restart's start, draws numbers of its own for every image; stream 0 (PGD's start) keeps
    the seed it always had."""
    streams = {**common.STREAMS, "restart 2": common.STREAMS["restart"] + 1}
    draws = {name: torch.stack([torch.rand(8, generator=common.sample_generator(3, i, s)) for i in range(300)])
             for name, s in streams.items()}  # (images, 8) per stream
    names = list(draws)
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            assert (draws[a] != draws[b]).all(), (a, b)
    assert torch.equal(draws["start"][7], torch.rand(8, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7)))


def test_random_targets_are_wrong_classes_and_fixed_per_index():
    index = torch.arange(1000)
    offsets = attacks.per_sample_randint(index, 9, seed=0, device=CPU)
    assert offsets.min() >= 0 and offsets.max() <= 8 and len(offsets.unique()) == 9  # y + 1 + [0, C−2]: never y
    counts = torch.bincount(offsets, minlength=9).float()
    assert counts.min() > 70  # about uniform (1000 / 9 ≈ 111 each)
    assert torch.equal(attacks.per_sample_randint(index[500:510].flip(0), 9, 0, CPU), offsets[500:510].flip(0))
    assert not torch.equal(attacks.per_sample_randint(index, 9, 1, CPU), offsets)


# ------------------------------------------------------------------------------------ against torchattacks
# The attacks of the AGFT paper's Table 6 (MI, NI, DI, TI, PI, PI++ and the targeted MI, DI, TI, NI), APGD-T and
# Square against the peer library torchattacks 3.5.1 (which the AGFT code runs; requirements-test.txt), on the demo
# CLIP, and their building blocks against independent computations.
#
# - Exact: our x_adv equals torchattacks' bit for bit for MI, NI, PI, PI++, and, given the same targets, MI-T and NI-T;
#   for DI, TI, DI-T and TI-T once torchattacks is handed our per-image random transforms, and for Square once it is
#   handed our stripes and squares (its loop, our draws).
#   Batches of 2^k images: torchattacks averages the loss over the batch and dividing by a power of two is exact in
#   floating point, so the gradients differ from our summed loss's by an exact factor, which sign and ∇/‖∇‖₁ remove.
# - Statistical (our random draws against torchattacks' own): DI, TI, DI-T, TI-T, APGD-T and Square, robust accuracy
#   within 3 standard errors of the paired difference (see `agreement`).
EPS, ALPHA = 4 / 255, 1 / 255  # the demo's budget (the tiny model at 32 × 32 is hardly attacked at 1/255)



class Classifier(torch.nn.Module):
    """logits_fn as an nn.Module, for torchattacks (it reads the device from the parameters)."""

    def __init__(self, encoder, logits_fn):
        super().__init__()
        self.encoder, self.logits_fn = encoder, logits_fn

    def forward(self, x):
        return self.logits_fn(x)


@pytest.fixture(scope="module")
def demo256():
    """The demo CLIP (pretrained, cached) and 256 held-out images (16 per class), as zero_shot_eval sees them."""
    encoder, _, ds, logits_fn = demo_zero_shot(16)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        clean = logits_fn(x).argmax(-1) == y
    assert clean.float().mean() > 0.95
    return logits_fn, Classifier(encoder, logits_fn), x, y, torch.arange(len(y)), clean


def robust(logits_fn, x_adv, y, clean):
    """(B,) bool: correct clean and at x_adv (zero_shot_eval's rule)."""
    with torch.no_grad():
        return (logits_fn(x_adv).argmax(-1) == y) & clean


# --------------------------------------------------------------------------------------------- building blocks
def test_gaussian_kernel_against_scipy_and_torchattacks():
    for size, nsig in ((15, 3), (3, 3), (7, 2)):
        pdf = scipy.stats.norm.pdf(np.linspace(-nsig, nsig, size))  # float64, with the 1/√(2π) we drop
        expected = np.outer(pdf, pdf) / np.outer(pdf, pdf).sum()
        ours = attacks.gaussian_kernel(size, nsig)
        assert ours.dtype == torch.float32 and abs(ours.sum().item() - 1) < 1e-6
        np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-6, atol=1e-12)
    ti = torchattacks.TIFGSM(torch.nn.Linear(1, 1))  # kernel 15, nsig 3: the defaults the AGFT code runs
    assert torch.equal(attacks.depthwise(attacks.gaussian_kernel(*attacks.TI_KERNEL)), ti.stacked_kernel)


def test_pi_projection_kernel_spreads_to_the_8_neighbours():
    """W_p ∗ C at each pixel is the mean of C over its 8 neighbours (zero outside the image): a float64 loop."""
    c = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    ours = torch.nn.functional.conv2d(c, attacks.depthwise(attacks.pi_projection_kernel()), padding=1, groups=3)
    a = np.pad(c.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros(c.shape)
    for i in range(6):
        for j in range(7):
            window = a[:, :, i:i + 3, j:j + 3]
            expected[:, :, i, j] = (window.sum(axis=(2, 3)) - window[:, :, 1, 1]) / 8
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    pi = torchattacks.PIFGSM(torch.nn.Linear(1, 1))
    assert torch.equal(attacks.depthwise(attacks.pi_projection_kernel()), pi.project_kern(3)[0])


def test_pi_plus_smoothing_kernel_is_torchattacks_layout():
    """torchattacks' PI++ 'Gaussian' smoothing: channel c convolved with K[i, c] at every column j (see
    attacks.pi_plus_smoothing_kernel); the true 3 × 3 Gaussian it was meant to be is nearly the identity."""
    pp = torchattacks.PIFGSMPP(torch.nn.Linear(1, 1))
    theirs = pp.gaussian_kern(3, 3)
    ours = attacks.pi_plus_smoothing_kernel()
    assert torch.equal(ours, theirs)
    k = attacks.gaussian_kernel(3, 3)
    for c in range(3):
        for i in range(3):
            assert torch.all(ours[c, 0, i] == k[i, c])  # constant along the width
    assert k[1, 1] > 0.95  # the Gaussian itself: centre weight 0.957


def test_input_diversity_equals_torchattacks_given_the_same_draws():
    """torchattacks' DIFGSM.input_diversity (one draw for the batch from the global RNG) against ours with the draws
    replayed from the same RNG state: the same image, bit for bit, whether the transform applies or not."""
    di = torchattacks.DIFGSM(torch.nn.Linear(1, 1))  # resize rate 0.9, probability 0.5
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    applied = 0
    for s in range(40):
        torch.manual_seed(s)
        theirs = di.input_diversity(x)
        torch.manual_seed(s)  # replay its draws: new side, top, left, then the coin
        r = int(torch.randint(28, 32, (1,), dtype=torch.int32))
        top, left = (int(torch.randint(0, 32 - r, (1,), dtype=torch.int32)) for _ in range(2))
        apply = int(torch.rand(1) < 0.5)
        ours = attacks.input_diversity(x, torch.tensor([[apply, r, top, left]]).expand(4, 4))
        assert torch.equal(ours, theirs), s
        applied += apply
    assert 10 < applied < 30  # both branches were compared


def test_input_diversity_params_cover_torchattacks_ranges_uniformly():
    """New side r uniform on {⌊0.9·32⌋, ..., 31} = {28, ..., 31}, top and left uniform on {0, ..., 31 − r}, applied
    with probability 0.5; fixed per (seed, index, iteration), independent of the batch."""
    index = torch.arange(8000)
    p = attacks.input_diversity_params(index, 2, 32, 0, CPU)  # (8000, 2, 4)
    apply, r, top, left = p.reshape(-1, 4).t()
    n = len(r)
    assert abs(apply.float().mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    assert set(r.tolist()) == {28, 29, 30, 31}
    assert scipy.stats.chisquare(torch.bincount(r)[28:].numpy()).pvalue > 1e-3
    for side in (28, 29, 30, 31):
        for offset in (top[r == side], left[r == side]):
            assert set(offset.tolist()) == set(range(32 - side))
            if side < 31:  # 31 leaves one place
                assert scipy.stats.chisquare(torch.bincount(offset).numpy()).pvalue > 1e-3
    assert torch.equal(attacks.input_diversity_params(index[100:110].flip(0), 2, 32, 0, CPU), p[100:110].flip(0))
    assert not torch.equal(attacks.input_diversity_params(index[:50], 2, 32, 1, CPU), p[:50])
    assert not torch.equal(p[:, 0], p[:, 1])  # a new draw every iteration


def test_dlr_targeted_loss_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 8, generator=g) * 4
    y, t = torch.randint(8, (30,), generator=g), torch.randint(8, (30,), generator=g)
    ours = attacks.dlr_targeted_loss(logits, y, t)
    for i in range(30):
        z = logits[i].tolist()
        s = sorted(z, reverse=True)
        expected = -(z[y[i]] - z[t[i]]) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12)
        assert math.isclose(ours[i].item(), expected, rel_tol=1e-5, abs_tol=1e-6)
    assert torch.allclose(attacks.dlr_targeted_loss(2.5 * logits - 1.0, y, t), ours, atol=1e-5)  # scale/shift-free
    with pytest.raises(ValueError):
        attacks.dlr_targeted_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))


def test_apgd_t_aims_at_the_2nd_to_10th_most_likely_classes(demo256, monkeypatch):
    """At ε = 0 no image is fooled, so APGD-T runs all 9 targets on every clean-correct image: targets k = 2..10 of
    the clean prediction's ranking, in order."""
    logits_fn, _, x, y, index, clean = demo256
    x, y, index = x[clean][:6], y[clean][:6], index[clean][:6]
    seen = []
    loss = attacks.dlr_targeted_loss

    def spy(logits, y_, target):
        seen.append(target.clone())
        return loss(logits, y_, target)
    monkeypatch.setattr(attacks, "dlr_targeted_loss", spy)
    x_adv = attacks.ATTACKS["apgd-t"](logits_fn, x, y, index, 0.0, ALPHA, 2, seed=0)
    assert torch.equal(x_adv, x)
    with torch.no_grad():
        ranked = logits_fn(x).argsort(dim=1, descending=True)
    targets = list(dict.fromkeys(tuple(t.tolist()) for t in seen))  # each run evaluates its target 3 times
    assert targets == [tuple(ranked[:, k].tolist()) for k in range(1, 10)]


def test_a_target_is_never_the_label(demo256, monkeypatch):
    """Images misclassified clean are attacked too with --attack-all and --metrics: with each image's label set to its
    2nd most likely class, APGD-T's first target is the most likely class (never the label), and with the label set
    to the least likely class, pgd-t-least aims at the next least likely one."""
    logits_fn, _, x, _, index, _ = demo256
    x, index = x[:8], index[:8]
    with torch.no_grad():
        order = logits_fn(x).argsort(dim=1, descending=True)  # (B, C)
    seen, loss, pgd_targeted = [], attacks.dlr_targeted_loss, attacks.pgd_targeted
    monkeypatch.setattr(attacks, "dlr_targeted_loss", lambda z, y_, t: seen.append(t.clone()) or loss(z, y_, t))
    attacks.ATTACKS["apgd-t"](logits_fn, x, order[:, 1], index, 0.0, ALPHA, 2, seed=0)
    assert torch.equal(seen[0], order[:, 0]) and all((t != order[:, 1]).all() for t in seen)
    aimed = []
    monkeypatch.setattr(attacks, "pgd_targeted", lambda f, z, t, *a: aimed.append(t) or pgd_targeted(f, z, t, *a))
    attacks.ATTACKS["pgd-t-least"](logits_fn, x, order[:, -1], index, 0.0, ALPHA, 2, seed=0)
    assert torch.equal(aimed[0], order[:, -2])


def test_apgd_t_is_not_applicable_below_4_classes():
    model = tiny_clip(2)
    model.requires_grad_(False)
    encoder = common.ImageEncoder(model.visual).eval()
    dist = common.Dist(0, 1, 0, CPU)
    for n_classes, expect_none in ((3, True), (4, False)):
        text = common.text_features(model, common.prompts_for([f"thing {i}" for i in range(n_classes)]), CPU)
        r = zero_shot_eval(encoder, text, common.SyntheticImages(6, n_classes, 32, seed=0), dist,
                                  ("apgd-dlr", "apgd-t"), 8 / 255, 1 / 255, 2, batch_size=4, attack_all=True)
        assert (r["apgd-t"] is None) == expect_none and r["apgd-dlr"] is not None


def test_square_schedule_matches_the_reference():
    """p_i, against torchattacks' Square.p_selection (the reference code's schedule), stretched to the budget and not
    (as AutoAttack builds it), for the default 5000 queries and a short run; and the side of the square on a
    224 × 224 image."""
    for n_iter in (5000, 300):
        for rescale in (True, False):  # square (torchattacks' default), square-aa (AutoAttack: resc_schedule=False)
            sq = torchattacks.Square(torch.nn.Linear(1, 1), n_queries=n_iter, resc_schedule=rescale)
            for i in range(n_iter):
                assert attacks.square_p(i, n_iter, rescale=rescale) == sq.p_selection(i), (n_iter, rescale, i)
    assert attacks.square_p(2001, 5000) == 0.8 / 128 and attacks.square_p(2001, 5000, rescale=False) == 0.8 / 64
    assert attacks.square_p(0, 10000) == 0.8 and attacks.square_p(11, 10000) == 0.4 and attacks.square_p(9999, 10000) \
        == 0.8 / 512
    assert round(math.sqrt(0.8 * 224 * 224)) == 200  # the first squares cover most of the image


def test_square_starts_from_vertical_stripes(demo256):
    logits_fn, _, x, y, index, _ = demo256
    x = x[:8].clamp(0.1, 0.9)  # away from 0 and 1, so no stripe is clipped
    x0 = attacks.attack_square(logits_fn, x, y[:8], index[:8], EPS, ALPHA, 0, seed=0)
    v = (x0 - x) / EPS  # (B, 3, H, W): ±1, constant down each column of each channel
    assert torch.allclose(v.abs(), torch.ones_like(v), atol=1e-4)
    assert torch.equal(v.sign(), v.sign()[:, :, :1].expand_as(v))
    assert 0.3 < (v > 0).float().mean() < 0.7 and not torch.equal(v.sign()[0], v.sign()[1])


def test_square_stops_querying_an_image_once_it_is_fooled(demo256):
    """Recording which image every query is of: a fooled image's last query is its first misclassified one; an
    image never fooled is queried exactly steps + 1 times (the start and one candidate per iteration)."""
    logits_fn, _, x, y, index, clean = demo256
    x, y, index = x[clean][:16], y[clean][:16], index[clean][:16]
    queries = [[] for _ in range(len(x))]  # per image: was the query misclassified?

    def recording(z):
        logits = logits_fn(z)
        owner = (z[:, None] - x[None]).flatten(2).abs().amax(-1).argmin(1)  # the image each row perturbs
        for i, wrong in zip(owner.tolist(), (logits.argmax(-1) != y[owner]).tolist()):
            queries[i].append(wrong)
        return logits

    steps = 40
    x_adv = attacks.attack_square(recording, x, y, index, 16 / 255, ALPHA, steps, seed=0)
    fooled = ~robust(logits_fn, x_adv, y, torch.ones_like(y, dtype=torch.bool))
    assert fooled.any() and not fooled.all()
    for i, q in enumerate(queries):
        if fooled[i]:
            assert q[-1] and not any(q[:-1]) and len(q) <= steps + 1
        else:
            assert len(q) == steps + 1 and not any(q)


# ------------------------------------------------------------------------------------- exact agreement
def torchattacks_for(name, model, eps, alpha, steps):
    """The torchattacks 3.5.1 attack that the AGFT code runs for `name`: ε, α, steps given, the rest default."""
    base = name.removesuffix("-t")
    if base in ("pi", "pi++"):  # these take ε and the number of iterations only
        return (torchattacks.PIFGSM if base == "pi" else torchattacks.PIFGSMPP)(model, eps, steps)
    cls = {"mi": torchattacks.MIFGSM, "ni": torchattacks.NIFGSM, "di": torchattacks.DIFGSM, "ti": torchattacks.TIFGSM}
    return cls[base](model, eps, alpha, steps)


@pytest.mark.parametrize("name", ["mi", "ni", "pi", "pi++", "mi-t", "ni-t", "di", "ti", "di-t", "ti-t"])
def test_same_adversarial_images_as_torchattacks(demo256, name):
    """Bit for bit on 16 images, 5 steps: the same batch through the same model ops, so the same rounding; torchattacks
    averages the loss over the batch where we sum it, a factor 1/16 (a power of two: every gradient scaled exactly,
    and sign and ∇/mean|∇| do not see it). Targeted: torchattacks aims at our targets (set_mode_targeted_by_function);
    DI/TI: its input_diversity is replaced by ours with our draws for each iteration, so what is compared is
    everything else (the transform itself is compared above)."""
    logits_fn, model, x, y, index, _ = demo256
    x, y, index = x[::16], y[::16], index[::16]  # 16 images, one per class
    steps = 5
    atk = torchattacks_for(name, model, EPS, ALPHA, steps)
    if name.endswith("-t"):
        target = attacks.random_target(logits_fn, x, y, index, 0)
        atk.set_mode_targeted_by_function(lambda images, labels: target, quiet=True)
    if name.removesuffix("-t") in ("di", "ti"):
        params, it = attacks.input_diversity_params(index, steps, 32, 0, CPU), iter(range(steps))
        atk.input_diversity = lambda z: attacks.input_diversity(z, params[:, next(it)])
    theirs = atk(x, y)
    ours = attacks.ATTACKS[name](logits_fn, x, y, index, EPS, ALPHA, steps, 0)
    assert torch.equal(ours, theirs)
    assert (ours != x).any()


def test_square_same_images_as_torchattacks_given_our_draws(demo256):
    """torchattacks' Square loop (one image per call, its draws replaced by ours: the stripes, then each iteration's
    position and channel signs) gives our x_adv bit for bit."""
    logits_fn, model, x, y, index, clean = demo256
    eps, steps = 24 / 255, 40
    x, y, index = x[clean][:8], y[clean][:8], index[clean][:8]
    # one image per call, as torchattacks' loop runs it: a forward of a batch of 1 rounds as its forwards do (the
    # logits of a batch of 8 can differ in the last bit, enough to flip an accept/reject decision now and then)
    ours = torch.cat([attacks.attack_square(logits_fn, x[i:i + 1], y[i:i + 1], index[i:i + 1], eps, ALPHA, steps,
                                           seed=0) for i in range(len(x))])
    for i in range(len(x)):
        stripes = attacks.per_sample_uniform(index[i:i + 1], (3, 1, 32), 0, "square stripes", CPU)[0]  # its draws
        u = attacks.per_sample_uniform(index[i:i + 1], (steps, 5), 0, "square", CPU)[0]  # for this image
        draws = {"position": [], "it": iter(range(steps))}
        sq = torchattacks.Square(model, eps=eps, n_queries=steps)

        def random_choice(shape):
            if len(shape) == 4:  # the start: [1, C, 1, W] stripes
                return torch.where(stripes < 0.5, -1.0, 1.0)[None]
            return torch.where(u[draws["k"], 2:] < 0.5, -1.0, 1.0)[:, None, None]  # [C, 1, 1] signs

        def random_int(low=0, high=1, shape=(1,)):
            if not draws["position"]:  # the row comes first: a new iteration
                draws["k"] = next(draws["it"])
                draws["position"] = [u[draws["k"], 0], u[draws["k"], 1]]
            return (low + (high - low) * draws["position"].pop(0)).long().reshape(1)
        sq.random_choice, sq.random_int = random_choice, random_int
        sq.init_hyperparam(x)
        _, theirs = sq.attack_single_run(x[i:i + 1], y[i:i + 1])  # its x_best (its perturb returns x if robust)
        assert torch.equal(theirs[0], ours[i]), i
    assert (~robust(logits_fn, ours, y, torch.ones_like(y, dtype=torch.bool))).any()


# ------------------------------------------------------------------------------------- statistical agreement
def agreement(ours, theirs, clusters):
    """Robust accuracies (%) of two randomised attacks on the same images, their difference and its standard error.
    Per image d_i = ours_i − theirs_i; our draws are independent per image, torchattacks' are shared by the images
    of one of its batches (`clusters`: (N,) batch id), so the standard error of mean(d) is the cluster-robust one,
    √(Σ_c (Σ_{i∈c} (d_i − d̄))²) / N. Under equal attacks the difference is 0 ± that (a few points at N = 256)."""
    d = ours.float() - theirs.float()
    n = len(d)
    per_cluster = torch.zeros(int(clusters.max()) + 1).index_add_(0, clusters, d - d.mean())
    se = per_cluster.pow(2).sum().sqrt().item() / n
    return 100 * ours.float().mean().item(), 100 * theirs.float().mean().item(), 100 * d.mean().item(), 100 * se


def run_torchattacks(make, x, y, batch_size):
    """torchattacks' x_adv in batches; make(k) builds the attack for batch k."""
    return torch.cat([make(k)(x[s:s + batch_size], y[s:s + batch_size])
                      for k, s in enumerate(range(0, len(x), batch_size))])


STATISTICAL = {  # name: (ε, α, steps, torchattacks' batch size): robust accuracies away from 0 and 100
    "di": (EPS, 2 * ALPHA, 5, 16), "ti": (EPS, 2 * ALPHA, 5, 16), "di-t": (8 * EPS, 8 * ALPHA, 5, 16),
    "ti-t": (8 * EPS, 8 * ALPHA, 5, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STATISTICAL))
def test_random_attacks_agree_with_torchattacks(demo256, name):
    logits_fn, model, x, y, index, clean = demo256
    eps, alpha, steps, batch_size = STATISTICAL[name]
    torch.manual_seed(0)  # torchattacks' draws (global RNG): one transform per batch, random targets per image

    def make(_):
        atk = torchattacks_for(name, model, eps, alpha, steps)
        if name.endswith("-t"):
            atk.set_mode_targeted_random(quiet=True)
        return atk
    theirs = robust(logits_fn, run_torchattacks(make, x, y, batch_size), y, clean)
    ours = robust(logits_fn, attacks.ATTACKS[name](logits_fn, x, y, index, eps, alpha, steps, 0), y, clean)
    a, b, diff, se = agreement(ours, theirs, torch.arange(len(x)) // batch_size)
    print(f"{name}: ours {a:.2f}, torchattacks {b:.2f}, difference {diff:+.2f} ± {se:.2f} (SE)")
    assert 10 < a < 90 and 10 < b < 90  # neither attack trivial nor hopeless here
    assert abs(diff) <= 3 * se and se < 5  # and the comparison could see a difference of 15 points


@pytest.mark.slow
def test_apgd_t_agrees_with_torchattacks(demo256):
    """APGD-T with 3 target classes and 10 iterations on 64 images against torchattacks' APGDT (n_classes = 4, so
    3 targets). It differs in details we choose otherwise (docs/attacks.md): a uniform random start instead of one on
    the ε-sphere, the same start for every target; each image's start is its own in both."""
    logits_fn, model, x, y, index, clean = demo256
    x, y, index, clean = x[::4], y[::4], index[::4], clean[::4]
    steps = 10
    theirs = robust(logits_fn, torchattacks.APGDT(model, eps=EPS, steps=steps, n_classes=4)(x, y), y, clean)
    ours = robust(logits_fn, attacks.attack_apgd_t(logits_fn, x, y, index, EPS, ALPHA, steps, 0, n_targets=3), y, clean)
    a, b, diff, se = agreement(ours, theirs, torch.arange(len(x)))
    print(f"apgd-t: ours {a:.2f}, torchattacks {b:.2f}, difference {diff:+.2f} ± {se:.2f} (SE)")
    assert 10 < a < 90 and 10 < b < 90
    assert abs(diff) <= 3 * se + 100 / len(x) and se < 4  # + one image: APGD is nearly deterministic, se can be 0


@pytest.mark.slow
def test_square_agrees_with_torchattacks(demo256):
    """Square with 30 queries at ε = 32/255 on 256 images against torchattacks' Square (margin loss, p_init 0.8,
    its schedule rescaled to the budget); its squares are shared by a batch, so its batches are the clusters."""
    logits_fn, model, x, y, index, clean = demo256
    eps, queries, batch_size = 32 / 255, 30, 16
    square = lambda k: torchattacks.Square(model, eps=eps, n_queries=queries, seed=k)  # noqa: E731  (it reseeds)
    theirs = robust(logits_fn, run_torchattacks(square, x, y, batch_size), y, clean)
    ours = robust(logits_fn, attacks.attack_square(logits_fn, x, y, index, eps, ALPHA, queries, 0), y, clean)
    a, b, diff, se = agreement(ours, theirs, torch.arange(len(x)) // batch_size)
    print(f"square: ours {a:.2f}, torchattacks {b:.2f}, difference {diff:+.2f} ± {se:.2f} (SE)")
    assert 10 < a < 90 and 10 < b < 90
    assert abs(diff) <= 3 * se and se < 5
