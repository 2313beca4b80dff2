"""The test-time defences (defenses.py; docs/defenses.md): TTC's weights, gate and draws against the formulas,
CLIPure-Cos's exact gradient against finite differences and the authors' gradient against it, the row bookkeeping of
the attacker's views; then evaluate.py --defense on the demo CLIP: every mode, its order (adaptive is not above the
others, known-noise not above adaptive), the large-ε check, the report, and bad input."""
import json
import math

import numpy as np
import pytest
import torch

import common
import defenses
import evaluate
from conftest import run_main_in_process, run_script, tiny_clip

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A random tiny CLIP's zero-shot classifier over 5 classes, and 6 images."""
    model = tiny_clip().requires_grad_(False)
    encoder = common.ImageEncoder(model.visual).eval()
    text = common.text_features(model, common.prompts_for([f"thing {i}" for i in range(5)]), CPU)
    null = common.text_features(model, ["This is a photo of a ."], CPU)[0]
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return defenses.Zeroshot(encoder, text, None, null), x, torch.arange(10, 16)


# ------------------------------------------------------------------------------------------------------------ TTC
def test_ttc_weights_are_the_softmax_of_beta_k():
    """w_k = e^{βk} / Σ_j e^{βj}: the paper's N = 2, β = 2 weights 0.016, 0.117, 0.867, and a loop at other N, β."""
    assert torch.allclose(defenses.ttc_weights(2, 2.0), torch.tensor([0.0159, 0.1173, 0.8668]), atol=1e-4)
    for n, beta in ((1, 0.5), (4, 3.0)):
        z = sum(math.exp(beta * j) for j in range(n + 1))
        assert torch.allclose(defenses.ttc_weights(n, beta), torch.tensor([math.exp(beta * k) / z
                                                                           for k in range(n + 1)]))


def test_ttc_gate_and_counterattack_follow_the_formula(tiny):
    """x + Δ is x + Σ_k w_k δ_k where τ < τ_th and x + δ₀ elsewhere; τ is ‖f(x + δ₀) − f(x)‖ / ‖f(x)‖; each δ_k is in
    the ε_c-ball and keeps x + δ_k in [0, 1]; the threshold is put between the images' τ so both branches occur."""
    zs, x, index = tiny
    ttc = defenses.TTC(zs, seed=0)
    delta0 = ttc.defender_start(x, index, 0)
    tau = (zs.encoder(x + delta0) - zs.encoder(x)).norm(dim=-1) / zs.encoder(x).norm(dim=-1)
    ttc.tau_th = float(tau.median())
    x_def, tau_seen, gate = ttc.counter(x, delta0)
    assert torch.allclose(tau_seen, tau, rtol=1e-5) and gate.any() and (~gate).any()
    deltas, f_start = defenses.ttc_counterattack(zs.encoder, x, delta0, ttc.eps, ttc.step, ttc.steps,
                                                 zs.encoder(x))  # (B, 3, ...)
    assert deltas.shape[1] == 3 and torch.equal(deltas[:, 0], delta0)
    assert torch.allclose(f_start, zs.encoder(x + delta0), atol=1e-6)  # τ's f(x + δ₀), the first step's forward
    assert deltas.abs().max() <= ttc.eps + 1e-7 and ((x[:, None] + deltas) >= 0).all()
    assert ((x[:, None] + deltas) <= 1).all()
    w = defenses.ttc_weights(2, 2.0)
    for i in range(len(x)):
        want = x[i] + (sum(w[k] * deltas[i, k] for k in range(3)) if tau[i] < ttc.tau_th else delta0[i])
        assert torch.allclose(x_def[i], want, atol=1e-6), i
    # the counterattack pushes the embedding away from f(x): further than the noise alone
    f = zs.encoder
    assert ((f(x + deltas[:, -1]) - f(x)).norm(dim=-1) > (f(x + delta0) - f(x)).norm(dim=-1)).all()


def test_ttc_draws_are_per_image_and_draw(tiny):
    """δ₀ depends on (seed, image index, draw) only: the same in any batch, bit for bit; another draw, another
    image or another seed give other numbers; the attacker's streams are not the defender's."""
    zs, x, index = tiny
    ttc = defenses.TTC(zs, seed=3)
    whole = ttc.defender_start(x, index, 0)
    parts = torch.cat([ttc.defender_start(x[s], index[s], 0) for s in (slice(0, 1), slice(1, 4), slice(4, 6))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ttc.defender_start(x, index, 1))
    assert not torch.equal(whole, defenses.TTC(zs, seed=4).defender_start(x, index, 0))
    assert not torch.equal(whole[0], ttc.defender_start(x[:1], index[1:2], 0)[0])
    attacker = defenses.ttc_start(x, index, ttc.eps, 3, torch.full((6,), defenses.ATTACKER))
    assert not torch.equal(whole, attacker)
    # the image TTC classifies, per image up to the float rounding of the batched forward: a counterattack gradient
    # entry within rounding of 0 can change sign and move that pixel by α_c (seen: a few of 18,432 values)
    whole_def = ttc.counter(x, whole)[0]
    alone = torch.cat([ttc.counter(x[i:i + 1], whole[i:i + 1])[0] for i in range(6)])
    assert ((whole_def - alone).abs() > 1e-6).float().mean() <= 1e-3


def test_rows_follow_the_images_through_subsets_and_reordering(tiny):
    """An attack calls a view on subsets of its batch, reordered: each row is mapped to its image's index (the clean
    image it is within ε of) and each image counts its own calls."""
    _, x, index = tiny
    rows = defenses.Rows(x, index)
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * 4 / 255).clamp(0, 1)
    idx, calls = rows.of(x_adv[[4, 1, 2]])
    assert idx.tolist() == [14, 11, 12] and calls.tolist() == [0, 0, 0]
    idx, calls = rows.of(x_adv)
    assert idx.tolist() == index.tolist() and calls.tolist() == [0, 1, 1, 0, 1, 0]


# --------------------------------------------------------------------------------------------------- CLIPure-Cos
def embedding_logits(e, t, text, create_graph, group=1):
    return 100 * defenses.clipure_cos(e, t, 10, 30.0, group, create_graph) @ text.t()


def test_clipure_exact_gradient_agrees_with_finite_differences():
    """The exact gradient (double backward through the 10 steps) against central finite differences, float64, on
    random embeddings (D = 6, 4 classes)."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(3, 6, dtype=torch.float64, generator=g)
    t = torch.nn.functional.normalize(torch.randn(6, dtype=torch.float64, generator=g), dim=0)
    text = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64, generator=g), dim=1)

    def f(e):
        u = e / e.norm(dim=-1, keepdim=True)  # the float() inside clipure_cos would drop to float32: stay in float64
        u = u if u.requires_grad else u.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(10):
                cos = (u * t).sum(-1) / u.norm(dim=-1)
                grad, = torch.autograd.grad(cos.sum(), u, create_graph=True)
                u = torch.nn.functional.normalize(u + 30.0 * grad / grad.norm(dim=-1, keepdim=True), dim=-1)
        return 100 * u @ text.t()
    # the function under test, in float32, computes the same map
    assert torch.allclose(embedding_logits(e.float(), t.float(), text.float(), True), f(e).float(), atol=1e-3)
    assert torch.autograd.gradcheck(lambda e: f(e), (e.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_clipure_authors_gradient_is_orders_smaller_and_unrelated(tiny):
    """Through the demo-sized classifier: the gradient of the cross-entropy w.r.t. the image through the authors'
    view (the purification's step direction detached, as the official code's attack gets it) is orders of magnitude
    smaller than the exact one and nearly uncorrelated with it; bpda-identity's is the undefended model's."""
    zs, x, index = tiny
    clipure = defenses.CLIPure(zs, seed=0)
    y = torch.arange(6) % 5
    grads = {}
    for view in ("authors", "exact", "bpda-identity"):
        fn = clipure.view(view, x, index)
        grads[view] = common.input_grad(lambda z: common.cross_entropy_per_sample(fn(z), y).sum(), x).flatten(1)
    plain = common.input_grad(lambda z: common.cross_entropy_per_sample(zs.logits(z), y).sum(), x).flatten(1)
    a, e = grads["authors"].double(), grads["exact"].double()
    ratio = a.norm(dim=1) / e.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(a, e, dim=1)
    assert (ratio < 1e-3).all(), ratio
    assert (cos.abs() < 0.5).all(), cos
    assert (e.norm(dim=1) > 0).all()
    assert torch.nn.functional.cosine_similarity(grads["bpda-identity"], plain, dim=1).min() > 0.5


def test_clipure_per_image_form_does_not_depend_on_the_batch_and_the_batch_form_does():
    """Per image (the default), a row's purified embedding is the same alone or in any batch (up to float rounding);
    the official batch form divides by the norm over two rows, so a row's result depends on its neighbour."""
    g = torch.Generator().manual_seed(1)
    e, t = torch.randn(4, 16, generator=g), torch.randn(16, generator=g)
    whole = defenses.clipure_cos(e, t)
    alone = torch.cat([defenses.clipure_cos(e[i:i + 1], t) for i in range(4)])
    assert torch.allclose(whole, alone, atol=1e-6)
    pairs = defenses.clipure_cos(e, t, group=2)
    assert not torch.allclose(pairs, whole, atol=1e-3)
    swapped = defenses.clipure_cos(e[[0, 2, 1, 3]], t, group=2)  # row 0's neighbour changes
    assert not torch.allclose(swapped[0], pairs[0], atol=1e-4)


# ------------------------------------------------------------------------------------------ evaluate.py --defense
def run_evaluate(argv, capsys):
    return run_main_in_process(evaluate.main, argv, capsys)


DEMO = ["--model", "demo", "--datasets", "demo", "--samples", "32", "--eps", "4", "--steps", "5", "--workers", "0",
        "--batch-size", "16", "--square-queries", "20", "--sanity-eps", "32"]


@pytest.mark.parametrize("defense,modes", [("ttc", "non-adaptive,authors,known-noise,adaptive"),
                                           ("clipure-cos", "non-adaptive,authors,adaptive")])
def test_every_mode_on_the_demo(defense, modes, tmp_path, capsys):
    """evaluate.py --defense on 32 demo images (PGD-5 and APGD-CE-5 at ε = 4/255; EOT 2): the undefended numbers stay
    as they are, every (attack, mode) has its accuracy and interval; adaptive is not above non-adaptive or authors
    beyond the 95% interval, known-noise not above adaptive beyond it; the large-ε check brings the undefended model
    to 0 and is reported behind the defence; the diagnostics and the threat model are in the JSON, and a rerun of the
    same command finds everything done."""
    out = tmp_path / "r.json"
    argv = [*DEMO, "--attacks", "pgd,apgd-ce", "--defense", defense, "--attack-mode", modes, "--eot", "2",
            "--out", str(out)]
    code, stdout, err = run_evaluate(argv, capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    row, ci = r["datasets"]["demo"], r["ci95"]["datasets"]["demo"]
    plain = json.loads(json.dumps(r))
    modes = modes.split(",")
    for attack in ("pgd", "apgd-ce"):
        for mode in modes:
            assert row[f"{attack}@{mode}"] is not None and ci[f"{attack}@{mode}"] is not None
            assert row[f"{attack}@{mode}"] <= row["clean@defended"]
        for weaker in ("non-adaptive", "authors"):
            assert row[f"{attack}@adaptive"] <= ci[f"{attack}@{weaker}"][1], (attack, weaker, row)
        if "known-noise" in modes:
            assert row[f"{attack}@known-noise"] <= ci[f"{attack}@adaptive"][1], row
    assert row["sanity"] == 0.0 and "sanity@adaptive" in row
    assert r["defense"]["name"] == defense and "not the defender's random draws" in r["defense"]["threat_model"]
    diagnostics = r["defense"]["diagnostics"]["mean"]
    if defense == "ttc":
        assert {"tau.clean", "gate.clean", "tau.adv", "gate.adv"} <= set(diagnostics)
    else:
        assert diagnostics["grad_ratio"] < 1e-6 and abs(diagnostics["grad_cos"]) < 0.1
    assert f"PGD-5, {defense}, adaptive" in (tmp_path / "r.md").read_text()
    n = r["datasets"]["demo"]["n"]
    for attack in ("pgd", "apgd-ce"):  # the adaptive variants account for every image the mode broke
        firsts = r["defense"]["broken_by"]["demo"][f"{attack}@adaptive"]
        assert list(firsts) == list(defenses.ADAPTIVE_VIEWS[defense]) + (["gate"] if defense == "ttc" else []) + \
            ["square"]
        assert sum(firsts.values()) == r["correct"]["demo"]["clean@defended"] - r["correct"]["demo"][
            f"{attack}@adaptive"], (firsts, n)
    code, stdout, _ = run_evaluate(argv, capsys)
    assert code == 0 and "already evaluated" in stdout
    assert json.loads(out.read_text())["datasets"] == plain["datasets"]


def test_compare_refuses_other_defence_settings(tmp_path, capsys):
    """Two evaluations of the same images and attacks, one behind TTC: --compare refuses to pair them."""
    base = [*DEMO[:-4], "--attacks", "pgd", "--samples", "8"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_evaluate([*base, "--out", str(a)], capsys)[0] == 0
    assert run_evaluate([*base, "--defense", "ttc", "--attack-mode", "non-adaptive", "--out", str(b)], capsys)[0] == 0
    code, _, err = run_evaluate(["--compare", str(a), str(b)], capsys)
    assert code == 2 and "--defense and its settings" in err, err


@pytest.mark.parametrize("extra,message", [
    (["--defense", "nope"], "invalid choice: 'nope'"),
    (["--defense", "ttc", "--attack-mode", "adaptive,sideways"], "--attack-mode sideways: unknown mode"),
    (["--defense", "clipure-cos", "--attack-mode", "known-noise"], "applies to randomised defences"),
    (["--defense", "ttc", "--eot", "0"], "--eot 0: must be >= 1"),
    (["--defense", "ttc", "--defense-draws", "0"], "--defense-draws 0: must be >= 1"),
    (["--defense", "ttc", "--amp", "fp16"], "--amp fp16: the defences differentiate"),
    (["--defense", "clipure-cos", "--compile"], "--compile: the exact gradient"),
])
def test_bad_defence_input_is_one_line(extra, message, tmp_path, capsys):
    """Each bad flag: exit 2, one line naming it, nothing written."""
    out = tmp_path / "r.json"
    code, _, err = run_evaluate([*DEMO, "--out", str(out), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_clipure_per_image_form_undoes_itself_where_clip_embeddings_lie():
    """Each per-image step turns u by arctan 30 = 88.09° towards t within the plane of u and t: an embedding less than
    88.09° from t (cos > 0.033, as CLIP's image embeddings are to a prompt, about 0.2) overshoots and comes back, so
    after 10 steps it is where it started, and after 9 it is 88.09° away; one beyond 88.09° keeps going."""
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    r = torch.randn(3, 512, generator=g)
    r = torch.nn.functional.normalize(r - (r @ t)[:, None] * t, dim=-1)  # orthogonal to t

    def angle(a, b):
        return torch.rad2deg(torch.arccos((a * b).sum(-1).clamp(-1, 1)))
    for c, back in ((0.2, True), (0.3, True), (0.02, False)):
        u0 = c * t + math.sqrt(1 - c * c) * r
        assert torch.allclose(angle(defenses.clipure_cos(u0, t, 9), u0), torch.full((3,), 88.09), atol=0.01)
        ten = angle(defenses.clipure_cos(u0, t, 10), u0)
        assert (ten < 0.1).all() if back else (ten > 170).all(), (c, ten)


@pytest.mark.slow
def test_two_processes_give_one_process_numbers(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) behind TTC, every mode: the same per-image results as one process, bit for
    bit, the float diagnostics too: the batches are the same, the draws follow the images, and both runs are scripts
    started alike, at the same thread count. (Against a run inside the test process, at 3 threads on 2 cores, τ
    differed in its last bits; I did not find why, so both runs here are started the same way.)"""
    argv = [*DEMO, "--samples", "16", "--steps", "3", "--square-queries", "10", "--attacks", "pgd", "--defense", "ttc",
            "--eot", "2", "--attack-mode", "non-adaptive,known-noise,adaptive"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for nproc, out in ((1, one), (2, two)):
        r = run_script(["evaluate.py", *argv, "--out", str(out)], nproc=nproc, timeout=600)
        assert r.returncode == 0, r.stderr
    a, b = (np.load(str(p.with_suffix(".samples.npz"))) for p in (one, two))
    fields = [k for k in a.files if k != "meta"]
    assert fields == [k for k in b.files if k != "meta"] and any(k.endswith("pgd@adaptive") for k in fields)
    for k in fields:
        assert np.array_equal(a[k], b[k], equal_nan=True), k


def test_ttc_costs_four_encoder_forwards_per_prediction(tiny):
    """docs/defenses.md's count: f(x), N = 2 steps (forward and input backward; the first one's f(x + δ₀) also gives
    τ), the final forward: 4 forwards, 2 of them with a backward; with a reference model, τ's f(x) and f(x + δ₀) are
    2 forwards of the reference besides."""
    zs, x, index = tiny
    calls = {"model": [], "reference": []}

    def counting(encoder, who):
        def forward(z):
            calls[who].append(torch.is_grad_enabled() and z.requires_grad)
            return encoder(z)
        return forward
    for reference in (None, counting(zs.encoder, "reference")):
        calls["model"].clear()
        ttc = defenses.TTC(defenses.Zeroshot(counting(zs.encoder, "model"), zs.text, reference, zs.null_text), seed=0)
        ttc.predict(x, index, 0)
        assert len(calls["model"]) == 4 and sum(calls["model"]) == 2, calls
    assert calls["reference"] == [False, False]
