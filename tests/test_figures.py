"""figures.py: each figure drawn from real evaluate.py outputs (the demo CLIP, a few images) and real training runs,
and bad inputs stopped in one line; evaluate.py --save-features against an independent computation. The demo's
own picture is checked with the demos (test_scripts.py)."""
import json
import os

import numpy as np
import pytest
import torch

import agft
import common
import eval_datasets
import evaluate
import figures
from conftest import run_main_in_process, run_script

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def evaluate_demo(out, *extra):
    """evaluate.py on 32 of the demo's held-out images, PGD-2, in this process; returns the results path."""
    evaluate.main(["--model", "demo", "--datasets", "demo", "--samples", "32", "--attacks", "pgd", "--steps", "2",
                   "--workers", "0", "--out", str(out), *extra])
    return str(out)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Real evaluate.py outputs: the demo CLIP at ε = 1, 2, 4 (one model at three budgets), a --save-features file
    of it, and the same evaluation with --metrics phi (the first attack on every image, as --save-features runs it)."""
    root = tmp_path_factory.mktemp("figures")
    results = {eps: evaluate_demo(root / f"demo-eps{eps}.json", "--eps", str(eps)) for eps in (1, 2, 4)}
    features = str(root / "demo.npz")
    evaluate_demo(root / "unused.json", "--eps", "4", "--save-features", features)
    phi = evaluate_demo(root / "phi.json", "--eps", "4", "--metrics", "phi")
    return {"results": results, "features": features, "phi": phi, "root": root}


def run_figures(argv, capsys):
    return run_main_in_process(figures.main, argv, capsys)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


# ---------------------------------------------------------------------------------------------- --save-features
def test_save_features_are_the_encoders_embeddings(outputs):
    """The clean embeddings are f(x) of the evaluated images (computed here independently, in one batch), with
    their labels; the adversarial ones are those of the evaluation's first attack: their correctness counts and
    mean angle are what a --metrics phi evaluation of the same images reports."""
    with np.load(outputs["features"], allow_pickle=False) as z:
        meta, arrays = json.loads(str(z["meta"])), {k: z[k] for k in z.files}
    assert meta["format"] == evaluate.FEATURES_FORMAT and meta["attack"] == "pgd" and meta["eps"] == 4
    assert meta["datasets"][0]["n"] == 32 and meta["datasets"][0]["adv"]
    model = common.load_clip("demo").requires_grad_(False)
    _, ds, names, _ = eval_datasets.eval_dataset("demo", ".", 32)
    assert meta["datasets"][0]["classes"] == names
    index = arrays["0.index"]
    assert index.tolist() == sorted(index.tolist()) and len(set(index.tolist())) == 32
    images = torch.stack([ds[int(i)][0] for i in index])
    with torch.no_grad():
        mine = common.ImageEncoder(model.visual).eval()(images)
    assert np.allclose(arrays["0.clean"], mine.numpy(), atol=1e-5)
    assert arrays["0.label"].tolist() == [ds[int(i)][1] for i in index]
    assert arrays["0.adv"].shape == arrays["0.clean"].shape and not np.allclose(arrays["0.adv"], arrays["0.clean"])
    phi = json.load(open(outputs["phi"]))
    assert int(arrays["0.correct.adv"].sum()) == phi["correct"]["demo"]["pgd"]
    assert int(arrays["0.correct.clean"].sum()) == phi["correct"]["demo"]["clean"]
    angle = evaluate.cosine_deviation(torch.from_numpy(arrays["0.clean"]), torch.from_numpy(arrays["0.adv"]))
    assert abs(angle.double().mean().item() - phi["metrics"]["mean"]["phi"]["adv"]) < 0.01


def test_save_features_bad_name_is_one_line(tmp_path, capsys):
    code, _, err = run_main_in_process(evaluate.main, ["--model", "demo", "--datasets", "demo", "--save-features",
                                                       str(tmp_path / "f.pickle")], capsys)
    assert code == 2 and err.count("\n") == 1 and "expected a file name ending in .npz" in err


@pytest.mark.slow
def test_save_features_with_two_processes_is_one_process(tmp_path):
    """The rows of both ranks gathered in dataset order: the same file content as one process, bit for bit (each
    image is in the same batch whatever the process count: common.eval_loader)."""
    files = []
    for nproc in (1, 2):
        path = tmp_path / f"f{nproc}.npz"
        p = run_script(["evaluate.py", "--model", "demo", "--datasets", "demo", "--samples", "24", "--attacks", "pgd",
                        "--steps", "2", "--batch-size", "5", "--workers", "0", "--save-features", str(path)],
                       nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        with np.load(path, allow_pickle=False) as z:
            files.append({k: z[k] for k in z.files if k != "meta"})
    assert files[0].keys() == files[1].keys()
    assert all(np.array_equal(files[0][k], files[1][k]) for k in files[0])


# ------------------------------------------------------------------------------------------------------ figures
def test_pareto_eps_and_tsne_are_drawn_from_real_outputs(outputs, tmp_path, capsys):
    results = outputs["results"]
    cases = [(["pareto", results[1], results[4], "--labels", "eps 1,eps 4", "--pdf"], "pareto.png"),
             (["eps", *results.values(), "--labels", "demo,demo,demo"], "eps.png"),
             (["tsne", outputs["features"], outputs["features"], "--labels", "original,fine-tuned", "--classes",
               "red circle,blue diamond"], "tsne.png")]
    for argv, name in cases:
        out = tmp_path / name
        code, stdout, err = run_figures([*argv, "--out", str(out)], capsys)
        assert code == 0, err
        assert is_png(out) and f"wrote {out}" in stdout
    with open(tmp_path / "pareto.pdf", "rb") as f:
        assert f.read(5) == b"%PDF-"


def test_tsne_phi_is_over_every_image_whatever_the_classes_drawn(outputs):
    """AdvFLYP Figure 5 prints φ beside the paper's 0.5859 / 0.1191 / 0.0983, which are over its 256 images: φ is the
    mean over every image of the features file, whichever classes the panel draws (--num-classes 0: all of them)."""
    features = figures.read_features([outputs["features"]], None)
    n = len(features[0][1]["label"])
    titles = [figures.tsne(features, ["m"], classes, k).axes[0].get_title()
              for classes, k in ((None, 0), ("red circle,blue diamond", 10), (None, 3))]
    assert len({t.split("φ = ")[1].split(" rad")[0] for t in titles}) == 1
    assert all(f"over {n} images" in t for t in titles)
    plt = figures.plt
    plt.close("all")


@pytest.mark.slow
def test_scaling_reads_the_training_runs_settings(outputs, tmp_path, capsys):
    """AdvFLYP Figure 3's axes from real runs: each evaluated model.pt's run folder says its --subset and batch."""
    paths = []
    for subset, batch in ((8, 4), (16, 4), (16, 8)):
        run = tmp_path / f"run-{subset}-{batch}"
        agft.main(["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "32", "--subset", str(subset),
                   "--batch-size", str(batch), "--max-steps", "1", "--workers", "0", "--out", str(run)])
        paths.append(str(tmp_path / f"eval-{subset}-{batch}.json"))
        evaluate.main(["--model", str(run / "model.pt"), "--datasets", "synthetic", "--samples", "8", "--attacks",
                       "pgd", "--steps", "1", "--workers", "0", "--out", paths[-1]])
    code, _, err = run_figures(["scaling", *paths, "--out", str(tmp_path / "s.png")], capsys)
    assert code == 0 and is_png(tmp_path / "s.png"), err
    assert [figures.run_setting(json.load(open(p)), "subset", p) for p in paths] == [8, 16, 16]
    code, _, err = run_figures(["scaling", *paths, "--values", "1,2,3", "--out", str(tmp_path / "v.png")], capsys)
    assert code == 0 and is_png(tmp_path / "v.png"), err
    code, _, err = run_figures(["scaling", outputs["results"][1], "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "is not in a training run's folder" in err and not (tmp_path / "x.png").exists()


def test_bad_inputs_are_one_line(outputs, tmp_path, capsys):
    """No file, not evaluate.py's output, an incomplete evaluation, another set of datasets, a missing attack,
    features of other images, a class that is not there: one line each, no picture."""
    one = outputs["results"][1]
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({**json.load(open(one)), "complete": False}))
    other = tmp_path / "other.json"
    report = json.load(open(one))
    other.write_text(json.dumps({**report, "settings": {**report["settings"], "datasets": ["CIFAR10"]}}))
    with np.load(outputs["features"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["0.index"] = arrays["0.index"] + 1
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, **arrays)
    (tmp_path / "bad.json").write_text("{not json")
    cases = [(["pareto"], "no results files given"),
             (["pareto", str(tmp_path / "none.json")], "none.json: no such file"),
             (["pareto", str(tmp_path / "bad.json")], "not a results file of evaluate.py"),
             (["eps", str(incomplete)], "the evaluation is incomplete"),
             (["pareto", one, str(other)], "a mean over other datasets cannot be compared"),
             (["pareto", one, "--attack", "aa"], "has no aa accuracy"),
             (["pareto", one, "--labels", "a,b"], "--labels: 2 labels for 1 files"),
             (["tsne", outputs["features"], str(shifted)], "holds other images of demo"),
             (["tsne", outputs["features"], "--classes", "pink hexagon"], "--classes pink hexagon: not a class"),
             (["tsne", one], "not a features file of evaluate.py --save-features"),
             (["demo", one], "not a demo's results.json"),
             (["pareto", one, "--out", str(tmp_path / "p.jpg")], "expected a .png file name")]
    for argv, message in cases:
        code, _, err = run_figures([*argv, "--out", str(tmp_path / "x.png")] if "--out" not in argv else argv, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    assert not os.path.exists(tmp_path / "x.png")
