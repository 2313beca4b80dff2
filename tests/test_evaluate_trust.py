"""evaluate.py as a reviewer uses it (docs/metrics.md, docs/evaluation.md): the structure metrics against a
direct NumPy computation, the 95% intervals (Wilson, MOVER, Newcombe's paired interval) against independent formulas
and exact coverage, the per-sample file and --compare, and resumable evaluation (kill -9, SIGTERM, another number of
processes, a rerun with other settings)."""
import json
import os
import signal
import subprocess
import sys
import time

import clip
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest, multinomial

import common
import eval_datasets
import evaluate
from conftest import ROOT, SCRIPT_THREADS, run_main_in_process, run_script, tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def run_in_process(argv, capsys):
    return run_main_in_process(evaluate.main, argv, capsys)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder with 8 classes (top5-iou needs more than 5) of 2 images each, and two tiny random CLIPs."""
    root = tmp_path_factory.mktemp("trust")
    rng = np.random.default_rng(0)
    for c in range(8):
        for i in range(2):
            os.makedirs(root / "eight" / f"class_{c}", exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "eight" / f"class_{c}" /
                                                                                     f"{i}.png")
    paths = {}
    for seed in (0, 1):
        paths[seed] = str(root / f"tiny{seed}.pt")
        torch.save({"model": tiny_clip(seed).state_dict()}, paths[seed])
    return {"folder": str(root / "eight"), "model": paths[0], "reference": paths[1], "root": root}


def load_samples(path):
    """The per-sample file, read as a reviewer would: NumPy only, no pickle."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def bits(arrays, k, field, n):
    return np.unpackbits(arrays[f"{k}.{field}"], count=n).astype(bool)


# ------------------------------------------------------------------------------------------ structure metrics
def test_metric_functions_match_numpy():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(6, 10, generator=g, dtype=torch.float64) * 0.6 - 0.1  # (B, C) cosine similarities
    ref = torch.randn(6, 10, generator=g, dtype=torch.float64)
    s = sim.numpy()
    z = 100 * s - (100 * s).max(1, keepdims=True)
    conf = 100 * (np.exp(z) / np.exp(z).sum(1, keepdims=True)).max(1)
    np.testing.assert_allclose(evaluate.max_softmax(100 * sim).numpy(), conf, rtol=1e-5)
    smax, smean = evaluate.similarity_max_mean(sim)
    np.testing.assert_allclose(smax.numpy(), 100 * s.max(1), rtol=1e-6)
    np.testing.assert_allclose(smean.numpy(), 100 * s.mean(1), rtol=1e-6)
    top, top_ref = np.argsort(-s, 1)[:, :5], np.argsort(-ref.numpy(), 1)[:, :5]
    iou = [100 * len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(top, top_ref)]
    np.testing.assert_allclose(evaluate.topk_iou(sim, ref).numpy(), iou, rtol=1e-6)
    assert evaluate.topk_iou(sim, sim).eq(100).all()
    assert evaluate.topk_iou(sim, -sim).eq(0).all()  # 10 classes: disjoint top-5s
    # φ: arccos in float64, also for tiny angles, where float32 arccos would round to 0
    f = torch.randn(5, 64, generator=g, dtype=torch.float64)
    for scale in (1.0, 1e-2, 1e-5):
        f_adv = f + scale * torch.randn(5, 64, generator=g, dtype=torch.float64)
        a, b = f.numpy(), f_adv.numpy()
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        expected = np.degrees(np.arccos(np.clip(cos, -1, 1)))
        np.testing.assert_allclose(evaluate.cosine_deviation(f.float(), f_adv.float()).numpy(), expected,
                                   rtol=2e-3 if scale < 1e-4 else 1e-5)
    assert evaluate.cosine_deviation(f, -f).sub(180).abs().max() < 1e-4


def direct_metrics(data):
    """Per-image metrics computed without evaluate.py's code path: clip's encoders, the images as the registry reads
    them, x_adv from the same attack function on all 16 images (one batch, as evaluate.py runs it)."""
    model, ref = tiny_clip(0), tiny_clip(1)
    _, ds, names, template = eval_datasets.eval_dataset(f"folder:{data['folder']}", str(data["root"]), 32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    tokens = clip.tokenize([template.format(c) for c in names], context_length=model.context_length)
    mean, std = torch.tensor(common.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(common.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        text = model.encode_text(tokens).double().numpy()
        ref_text = ref.encode_text(tokens).double().numpy()
        feats = lambda m, images: m.encode_image((images - mean) / std).double().numpy()  # noqa: E731
        f, f_ref = feats(model, x), feats(ref, x)
    text_t = common.text_features(model, [template.format(c) for c in names], "cpu")
    encoder = common.ImageEncoder(model.visual)
    logits_fn = lambda im: 100 * common.cosine_sim(encoder(im), text_t)  # noqa: E731
    x_adv = common.attack_pgd(logits_fn, x, y, torch.arange(len(x)), 8 / 255, 2 / 255, 2, 0)
    with torch.no_grad():
        f_adv = feats(model, x_adv)

    def cos(a, t):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T

    out = {}
    ref_top = np.argsort(-cos(f_ref, ref_text), 1)[:, :5]  # the reference model on the clean image (§4.4)
    for which, a in (("clean", f), ("adv", f_adv)):
        s = cos(a, text)  # (N, C)
        e = np.exp(100 * s - (100 * s).max(1, keepdims=True))
        out[f"conf.{which}"] = 100 * (e / e.sum(1, keepdims=True)).max(1)
        out[f"smax.{which}"], out[f"smean.{which}"] = 100 * s.max(1), 100 * s.mean(1)
        top = np.argsort(-s, 1)[:, :5]
        out[f"top5-iou.{which}"] = np.array([100 * len(set(p) & set(q)) / len(set(p) | set(q))
                                             for p, q in zip(top, ref_top)])
    c = (f * f_adv).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(f_adv, axis=1)
    out["phi.adv"] = np.degrees(np.arccos(np.clip(c, -1, 1)))
    return out, y.numpy()


def test_structure_metrics_match_a_direct_computation(data, tmp_path, capsys):
    """Every metric, per image and as the JSON's mean, on clean images and on PGD's x_adv of every image (the random
    tiny model classifies few images correctly: those it misclassifies count too); top-5 IoU against the reference
    model's clean top-5; and the Markdown table shows them."""
    out = tmp_path / "m.json"
    code, stdout, err = run_in_process(["--model", data["model"], "--datasets", f"folder:{data['folder']}",
                                        "--attacks", "pgd", "--steps", "2", "--eps", "8", "--alpha", "2",
                                        "--metrics", "all", "--reference-model", data["reference"], "--workers", "0",
                                        "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    expected, labels = direct_metrics(data)
    meta, arrays = load_samples(tmp_path / "m.samples.npz")
    assert meta["datasets"][0]["name"] == "eight" and meta["datasets"][0]["n"] == 16
    assert report["datasets"]["eight"]["clean"] < 50  # most images are misclassified clean, yet all enter φ
    np.testing.assert_array_equal(arrays["0.label"], labels)
    for field, values in expected.items():
        np.testing.assert_allclose(arrays[f"0.{field}"], values, rtol=1e-4, atol=1e-3, err_msg=field)
        metric, which = field.split(".")
        assert abs(report["metrics"]["datasets"]["eight"][metric][which] - values.mean()) <= 0.0051, field
        assert report["metrics"]["mean"][metric][which] == report["metrics"]["datasets"]["eight"][metric][which]
    assert "every image" in report["metrics"]["over"] and report["metrics"]["reference_model"] == data["reference"]
    md = (tmp_path / "m.md").read_text()
    assert "| φ (°), PGD-2 | " + f"{report['metrics']['datasets']['eight']['phi']['adv']:.2f}" in md
    assert "| top-5 IoU (%), clean | " in md and "| conf, PGD-2 | " in md and md in stdout


def test_metrics_usage(data, tmp_path, capsys):
    """top5-iou's reference: a one-line error when it cannot be known; a run's args.json names it; phi needs an
    attack; with 5 classes or fewer top5-iou does not apply."""
    base = ["--datasets", f"folder:{data['folder']}", "--workers", "0", "--out", str(tmp_path / "r.json")]
    code, _, err = run_in_process(["--model", data["model"], "--metrics", "top5-iou", *base], capsys)
    assert code == 2 and err.startswith("error: --metrics top5-iou: give --reference-model") and err.count("\n") == 1
    code, _, err = run_in_process(["--model", data["model"], "--metrics", "phi", "--attacks", "none", *base], capsys)
    assert code == 2 and "--metrics phi: needs an attack" in err
    code, _, err = run_in_process(["--model", data["model"], "--metrics", "conf,iou", *base], capsys)
    assert code == 2 and "--metrics iou: unknown metric" in err
    assert not (tmp_path / "r.json").exists()
    run = tmp_path / "run"
    os.makedirs(run)
    torch.save({"model": tiny_clip(0).state_dict()}, run / "last.pt")
    (run / "args.json").write_text(json.dumps({"model": data["reference"], "method": "agft"}))
    args = evaluate.parse_args(["--model", str(run / "last.pt"), "--metrics", "all", *base])
    assert args.reference_model == data["reference"] and args.metrics == list(evaluate.STRUCTURE_METRICS)
    assert evaluate.sample_fields(["apgd-dlr", "pgd"], ["top5-iou", "phi"], 2) == ["label", "clean", "pgd"]
    assert evaluate.sample_fields(["pgd"], ["top5-iou", "conf"], 5) == ["label", "clean", "pgd", "conf.clean",
                                                                      "conf.adv"]


# ------------------------------------------------------------------------------------------------- intervals
def test_wilson_interval_matches_scipy():
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (37, 512), (500, 512), (3, 7), (0, 1), (1, 1)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(evaluate.wilson_interval(k, n), (ci.low, ci.high), rtol=1e-10, atol=1e-12)
    assert evaluate.wilson_interval(0, 0) is None


def newcombe_numpy(a, b, c, d, z=1.959963984540054):
    """Newcombe (1998) method 10 written out again, vectorised in float64 (arrays of the four cell counts)."""
    a, b, c, d = (np.asarray(v, np.float64) for v in (a, b, c, d))
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n

    def wilson(p):
        centre = (2 * n * p + z ** 2) / (2 * (n + z ** 2))
        half = z * np.sqrt(z ** 2 + 4 * n * p * (1 - p)) / (2 * (n + z ** 2))
        return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)

    (l1, u1), (l2, u2) = wilson(p1), wilson(p2)
    num = a * d - b * c
    num = np.where(num > 0, np.maximum(num - n / 2, 0), num)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1)), 0)
    lo = p1 - p2 - np.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    hi = p1 - p2 + np.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2, lo, hi


def all_tables(n):
    return np.array([(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a)
                     for c in range(n + 1 - a - b)])


def test_paired_interval_matches_the_formula_and_covers():
    """Newcombe's interval against the formula written out in NumPy (every table of n = 12, and large ones), then its
    exact coverage: the probability, summed over all 2 × 2 tables of n = 40 pairs, that the interval holds the true
    difference, near 95% for paired accuracies of the kind evaluations produce."""
    tables = np.concatenate([all_tables(12), [[4000, 300, 200, 5500], [9990, 0, 0, 10], [0, 0, 0, 50],
                                              [30, 0, 0, 0], [0, 25, 0, 0], [250, 3, 40, 219]]])
    ours = np.array([evaluate.paired_difference_interval(*map(int, t)) for t in tables])
    np.testing.assert_allclose(ours, np.stack(newcombe_numpy(*tables.T), 1), rtol=1e-10, atol=1e-12)
    assert (ours[:, 1] <= ours[:, 0] + 1e-12).all() and (ours[:, 0] <= ours[:, 2] + 1e-12).all()
    assert (ours[:, 1] >= -1 - 1e-12).all() and (ours[:, 2] <= 1 + 1e-12).all()
    tables = all_tables(40)
    intervals = np.array([evaluate.paired_difference_interval(*map(int, t))[1:] for t in tables])
    for p in [(0.4, 0.1, 0.05, 0.45), (0.3, 0.2, 0.1, 0.4), (0.7, 0.05, 0.05, 0.2), (0.45, 0.15, 0.15, 0.25)]:
        truth = p[1] - p[2]
        covered = (intervals[:, 0] <= truth) & (truth <= intervals[:, 1])
        coverage = multinomial.pmf(tables, 40, p)[covered].sum()
        assert 0.93 <= coverage <= 0.99, (p, coverage)


def test_mover_mean_interval():
    """The interval of an unweighted mean over datasets: the formula, K = 1 is the interval itself, and its exact
    coverage for the mean of two accuracies on 30 and 50 images."""
    est, iv = [0.5, 0.2, 0.9], [(0.4, 0.55), (0.1, 0.35), (0.85, 0.93)]
    lo, hi = evaluate.mover_mean(est, iv)
    assert lo == pytest.approx(np.mean(est) - np.sqrt(0.1 ** 2 + 0.1 ** 2 + 0.05 ** 2) / 3)
    assert hi == pytest.approx(np.mean(est) + np.sqrt(0.05 ** 2 + 0.15 ** 2 + 0.03 ** 2) / 3)
    assert evaluate.mover_mean([0.3], [(0.2, 0.45)]) == pytest.approx((0.2, 0.45))
    for p1, p2 in [(0.5, 0.8), (0.15, 0.35), (0.9, 0.6)]:
        k1, k2 = np.meshgrid(np.arange(31), np.arange(51), indexing="ij")
        prob = binom_pmf(k1, 30, p1) * binom_pmf(k2, 50, p2)
        inside = np.zeros_like(prob, bool)
        for i in range(31):
            for j in range(51):
                lo, hi = evaluate.mover_mean([i / 30, j / 50], [evaluate.wilson_interval(i, 30),
                                                                evaluate.wilson_interval(j, 50)])
                inside[i, j] = lo <= (p1 + p2) / 2 <= hi
        assert 0.93 <= prob[inside].sum() <= 0.99, (p1, p2, prob[inside].sum())


def binom_pmf(k, n, p):
    from scipy.stats import binom
    return binom.pmf(k, n, p)


# ------------------------------------------------------------------------------------- per-sample, --compare
@pytest.fixture(scope="module")
def two_models(data, tmp_path_factory):
    """The two tiny models evaluated on the same 12 of the 16 images, PGD and C&W: (A.json, B.json)."""
    folder = tmp_path_factory.mktemp("compare")
    out = {}
    for key, model in (("a", data["model"]), ("b", data["reference"])):
        out[key] = str(folder / f"{key}.json")
        evaluate.main(["--model", model, "--datasets", f"folder:{data['folder']}", "--attacks", "pgd,cw",
                       "--attack-all", "--samples", "12", "--steps", "2", "--eps", "8", "--workers", "0",
                       "--out", out[key]])
    return out


def test_per_sample_file_and_intervals_in_the_json(two_models, data, tmp_path, capsys):
    report = json.load(open(two_models["a"]))
    assert report["complete"] and report["per_sample"]["file"] == "a.samples.npz"
    path = os.path.join(os.path.dirname(two_models["a"]), "a.samples.npz")
    assert common.file_sha256(path) == report["per_sample"]["sha256"]
    meta, arrays = load_samples(path)
    assert meta["settings"] == report["settings"] and meta["datasets"][0]["fields"] == ["label", "clean", "pgd", "cw"]
    ds = eval_datasets.eval_dataset(f"folder:{data['folder']}", str(data["root"]), 32)[1]
    np.testing.assert_array_equal(arrays["0.index"], evaluate.fixed_subset(ds, 12, 0).indices)  # dataset indices
    assert arrays["0.clean"].dtype == np.uint8 and arrays["0.clean"].shape == (2,)  # 12 bits in 2 bytes
    for c in ("clean", "pgd", "cw"):
        k = int(bits(arrays, 0, c, 12).sum())
        assert report["correct"]["eight"][c] == k and report["datasets"]["eight"][c] == round(100 * k / 12, 2)
        ci = binomtest(k, 12).proportion_ci(method="wilson")
        assert report["ci95"]["datasets"]["eight"][c] == [round(100 * ci.low, 2), round(100 * ci.high, 2)]
        assert report["ci95"]["mean"][c] == report["ci95"]["datasets"]["eight"][c]  # one dataset: the same
    assert "Wilson" in report["ci95"]["method"] and "MOVER" in report["ci95"]["method"]
    # --intervals puts them in the table
    out = tmp_path / "i.json"
    code, stdout, _ = run_in_process(["--model", data["model"], "--datasets", f"folder:{data['folder']}",
                                      "--attacks", "none", "--samples", "12", "--intervals", "--workers", "0",
                                      "--out", str(out)], capsys)
    lo, hi = json.loads(out.read_text())["ci95"]["datasets"]["eight"]["clean"]
    assert code == 0 and f"[{lo:.2f}, {hi:.2f}]" in (tmp_path / "i.md").read_text()


def test_compare_is_paired_and_matches_a_direct_computation(two_models, capsys):
    code, stdout, err = run_in_process(["--compare", two_models["a"], two_models["b"]], capsys)
    assert code == 0, err
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ") and "eight" in line}
    assert set(rows) == {"clean", "PGD-2", "C&W-2"}
    _, A = load_samples(two_models["a"].replace(".json", ".samples.npz"))
    _, B = load_samples(two_models["b"].replace(".json", ".samples.npz"))
    for field, label in (("clean", "clean"), ("pgd", "PGD-2"), ("cw", "C&W-2")):
        x, y = bits(A, 0, field, 12), bits(B, 0, field, 12)
        d, lo, hi = newcombe_numpy((x & y).sum(), (x & ~y).sum(), (~x & y).sum(), (~x & ~y).sum())
        cells = rows[label]
        assert cells[2:] == ["12", f"{100 * x.mean():.2f}", f"{100 * y.mean():.2f}", f"{100 * d:+.2f}",
                             f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", str((x & ~y).sum()), str((~x & y).sum())]
    assert "Newcombe" in stdout


@pytest.mark.parametrize("change,named", [(["--eps", "4"], "--eps"), (["--samples", "10"], "--samples"),
                                          (["--seed", "1"], "--seed"), (["--attacks", "pgd"], "--attacks"),
                                          (["--steps", "3"], "--steps"), (["--datasets", "demo"], "--datasets")])
def test_compare_refuses_other_images_or_attacks(change, named, two_models, data, tmp_path, capsys):
    argv = ["--model", data["reference"], "--datasets", f"folder:{data['folder']}", "--attacks", "pgd,cw",
            "--attack-all", "--samples", "12", "--steps", "2", "--eps", "8", "--seed", "0", "--workers", "0"]
    for flag, value in zip(change[::2], change[1::2]):
        argv[argv.index(flag) + 1] = value
    other = str(tmp_path / "other.json")
    assert run_in_process(argv + ["--out", other], capsys)[0] == 0
    code, stdout, err = run_in_process(["--compare", two_models["a"], other], capsys)
    assert code == 2 and err.startswith("error: --compare:") and err.count("\n") == 1 and named in err
    assert "same images" in err and stdout == ""


def test_compare_refuses_an_incomplete_or_altered_evaluation(two_models, tmp_path, capsys):
    report = json.load(open(two_models["a"]))
    copy = tmp_path / "a.json"
    copy.write_text(json.dumps({**report, "complete": False}))
    samples = tmp_path / "a.samples.npz"
    samples.write_bytes(open(two_models["a"].replace(".json", ".samples.npz"), "rb").read())
    code, _, err = run_in_process(["--compare", str(copy), two_models["b"]], capsys)
    assert code == 2 and "incomplete" in err
    copy.write_text(json.dumps(report))
    assert run_in_process(["--compare", str(copy), two_models["b"]], capsys)[0] == 0
    raw = bytearray(samples.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # any change of the file
    samples.write_bytes(bytes(raw))
    code, _, err = run_in_process(["--compare", str(copy), two_models["b"]], capsys)
    assert code == 2 and "sha256 differs" in err and err.count("\n") == 1
    code, _, err = run_in_process(["--compare", str(tmp_path / "missing.json"), two_models["b"]], capsys)
    assert code == 2 and err == f"error: --compare {tmp_path / 'missing.json'}: no such file\n"


# ------------------------------------------------------------------------------------------------------ resume
DEMO = ["--model", "demo", "--datasets", "demo,folder:{folder}", "--samples", "48", "--attacks", "pgd,aa",
        "--steps", "2", "--eps", "4", "--metrics", "conf,phi", "--batch-size", "2", "--save-every", "0",
        "--workers", "0"]  # 24 + 8 batches, saved after each


def demo_argv(data, out):
    return [a.replace("{folder}", data["folder"]) for a in DEMO] + ["--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference: the resume tests' command run once without interruption (demo CLIP: most images are attacked)."""
    out = tmp_path_factory.mktemp("whole") / "r.json"
    evaluate.main(demo_argv(data, out))
    return out


def assert_same_evaluation(out, reference):
    """Same numbers in the JSON and the same per-image results, bit for bit (every image is evaluated in the same
    batch whatever the number of processes and wherever a run was interrupted)."""
    a, b = json.loads(out.read_text()), json.loads(reference.read_text())
    assert a["complete"] and b["complete"]
    for key in ("datasets", "mean", "correct", "ci95", "metrics"):
        assert a[key] == b[key], key
    (_, x), (_, y) = (load_samples(str(p).replace(".json", ".samples.npz")) for p in (out, reference))
    assert set(x) == set(y)
    for k in x:
        if k != "meta":
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def descendants(pid):
    """The ids of every process below `pid` (Linux /proc)."""
    children = {}
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found, todo = found + kids, todo + kids
    return found


def done_count(path):
    meta, arrays = load_samples(path)
    return sum(int(bits(arrays, k, "done", d["n"]).sum()) for k, d in enumerate(meta["datasets"]))


@pytest.mark.slow
def test_sigterm_saves_and_exits_75_then_the_rerun_completes(data, uninterrupted, tmp_path, capsys):
    out = tmp_path / "r.json"
    samples = tmp_path / "r.samples.npz"
    proc = subprocess.Popen([sys.executable, "evaluate.py", *demo_argv(data, out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **SCRIPT_THREADS, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not samples.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == common.PREEMPTED == 75, stderr[-2000:]
    assert "preempted (SIGTERM)" in stdout and "rerun the same command" in stdout and "Traceback" not in stderr
    assert 0 < done_count(samples) < 48
    code, _, _ = run_in_process(demo_argv(data, out), capsys)
    assert code == 0
    assert_same_evaluation(out, uninterrupted)


@pytest.fixture
def stopped_after_five_batches(data, tmp_path, monkeypatch, capsys):
    """A one-process run stopped by a (simulated) preemption notice after its fifth batch: the state it saved."""
    calls = []
    monkeypatch.setattr(common.Preemption, "requested", lambda self, dist: calls.append(1) or len(calls) >= 5)
    out = tmp_path / "r.json"
    code, stdout, _ = run_in_process(demo_argv(data, out), capsys)
    monkeypatch.undo()
    assert code == common.PREEMPTED and "preempted" in stdout
    assert done_count(tmp_path / "r.samples.npz") == 5 * 2
    return out


@pytest.mark.slow
def test_resume_with_two_processes_of_a_one_process_run(data, uninterrupted, stopped_after_five_batches):
    p = run_script(["evaluate.py", *demo_argv(data, stopped_after_five_batches)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(stopped_after_five_batches.read_text())
    assert report["settings"]["processes"] == 2
    assert_same_evaluation(stopped_after_five_batches, uninterrupted)


@pytest.mark.slow
def test_kill9_of_two_processes_mid_dataset_then_one_process_gives_the_same_numbers(data, uninterrupted, tmp_path,
                                                                                    capsys):
    """kill -9 of a 2-process run (torchrun and both workers) in the middle of the first dataset; the same command
    with one process continues from the last save and ends with the uninterrupted run's numbers."""
    out, samples = tmp_path / "r.json", tmp_path / "r.samples.npz"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "evaluate.py", *demo_argv(data, out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **SCRIPT_THREADS})
    deadline = time.time() + 180
    while not samples.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in descendants(proc.pid) + [proc.pid]:  # torchrun starts its workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert 0 < done_count(samples) < 48  # killed in the middle of the first dataset
    assert not out.exists()  # the results JSON is written once a dataset is complete
    code, stdout, _ = run_in_process(demo_argv(data, out), capsys)
    assert code == 0 and "demo: continuing" in stdout
    assert_same_evaluation(out, uninterrupted)
    assert any("continued after an interruption" in n for n in json.loads(out.read_text())["notes"])


def test_a_rerun_with_other_settings_stops_and_overwrites_nothing(data, uninterrupted, stopped_after_five_batches,
                                                                  capsys):
    for out in (stopped_after_five_batches, uninterrupted):  # a partial state, then a finished evaluation
        files = [p for p in (out, out.with_suffix(".md"), out.parent / "r.samples.npz") if p.exists()]
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
        argv = demo_argv(data, out)
        argv[argv.index("--eps") + 1] = "8"
        code, stdout, err = run_in_process(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "--eps: 8.0 here, 4.0 there" in err
        assert "another --out" in err and "delete" in err
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
        assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())
