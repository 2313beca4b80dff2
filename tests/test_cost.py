"""Cost accounting (docs/performance.md): the encoder passes each training step and each attack makes, counted on
real runs, and the benchmark mode of every script (run with tiny settings; its timings are not asserted)."""
import json
import os

import clip
import pytest
import torch

import advflyp
import agft
import common
import evaluate
import fare
import tecoa
from conftest import run_script, zero_shot_eval

pytestmark = pytest.mark.usefixtures("one_thread")

# Passes of the image encoder per training step, the cost table of docs/performance.md, with K = --attack-steps:
# (PGD forwards with an input-only backward, no-grad forwards of the frozen original, training-mode forwards).
# One backward through the training-mode forwards follows.
PASSES_PER_STEP = {
    "agft": (agft.main, [], lambda k: (k, 1, 1)),  # f_orig(x) for the soft target, f_θ(x_adv)
    "tecoa": (tecoa.main, [], lambda k: (k, 0, 1)),  # f_θ(x_adv)
    "pmg-aft": (tecoa.main, ["--pmg"], lambda k: (k, 1, 2)),  # f_orig(x_adv); f_θ(x_adv), f_θ(x)
    "tga-zsr": (tecoa.main, ["--tga"], lambda k: (k, 1, 2)),  # f_orig(x); f_θ(x_adv), f_θ(x), all with tokens
    "advflyp-none": (advflyp.main, ["--reg", "none"], lambda k: (k, 0, 1)),  # f_θ(x_adv)
    "advflyp-full": (advflyp.main, ["--reg", "full"], lambda k: (k, 1, 2)),  # f_orig(x_adv); f_θ(x_adv), f_θ(x)
    "advflyp-orig": (advflyp.main, ["--reg-terms", "orig"], lambda k: (k, 1, 1)),  # term (ii) alone: no f_θ(x)
    "advflyp-clean": (advflyp.main, ["--reg-terms", "clean"], lambda k: (k, 0, 2)),  # term (i) alone: no f_orig
    "advflyp-text": (advflyp.main, ["--train", "text"], lambda k: (k, 1, 2)),  # as full; the text pass is trained
    "advflyp-all": (advflyp.main, ["--train", "all"], lambda k: (k, 1, 2)),
    "tecoa-reg": (tecoa.main, ["--reg", "full"], lambda k: (k, 1, 2)),  # f_orig(x_adv); f_θ(x_adv), f_θ(x)
    "fare": (fare.main, [], lambda k: (k, 1, 1)),  # f_orig(x), the target embeddings; f_θ(x_adv)
}


@pytest.fixture
def counter(monkeypatch):
    """Counts ImageEncoder forward passes by kind, the input backwards of the attack passes ("backward"), and calls
    of CLIP's text encoder."""
    counts = {"attack": 0, "backward": 0, "frozen": 0, "train": 0, "other": 0, "text": 0, "tokens": 0}
    image_forward, encode_text = common.ImageEncoder.forward, clip.model.CLIP.encode_text  # advflyp.TextEncoder's too

    def counted_image_forward(self, x, tokens=False):
        frozen = not any(p.requires_grad for p in self.parameters())
        if frozen and not torch.is_grad_enabled():
            kind = "frozen"  # the original encoder f_θorig, under no_grad
        elif not self.training and torch.is_grad_enabled() and x.requires_grad:
            kind = "attack"  # an attack step: eval mode, gradient w.r.t. the input
            x.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
        elif self.training and torch.is_grad_enabled():
            kind = "train"
        else:
            kind = "other"
        counts[kind] += 1
        counts["tokens"] += tokens  # passes that keep every token (TGA-ZSR)
        return image_forward(self, x, tokens)

    def counted_encode_text(self, text):
        counts["text"] += 1
        return encode_text(self, text)

    monkeypatch.setattr(common.ImageEncoder, "forward", counted_image_forward)
    monkeypatch.setattr(clip.model.CLIP, "encode_text", counted_encode_text)
    return counts


def train_counts(main, extra, steps, attack_steps, out, counts):
    for k in counts:
        counts[k] = 0
    main(["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "16", "--batch-size", "4",
          "--max-steps", str(steps), "--attack-steps", str(attack_steps), "--workers", "0", "--amp", "off",
          "--log-every", "1", "--out", str(out), *extra])
    return dict(counts)


# the ablations' variants count the same kinds of pass: the inner loop leaves them to the whole suite
ABLATIONS = ("advflyp-orig", "advflyp-clean", "advflyp-text", "advflyp-all", "tecoa-reg")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in ABLATIONS else m
                                    for m in PASSES_PER_STEP])
def test_encoder_passes_per_training_step_match_the_cost_table(method, counter, tmp_path):
    main, extra, per_step = PASSES_PER_STEP[method]
    runs = {(n, k): train_counts(main, extra, n, k, tmp_path / f"{n}-{k}", counter) for n, k in [(1, 1), (3, 2)]}
    for (n, k), c in runs.items():
        assert (c["attack"], c["frozen"], c["train"]) == tuple(n * v for v in per_step(k)), (method, n, k, c)
        assert c["backward"] == c["attack"], c  # every PGD step takes its gradient
        assert c["other"] == 0, c
        assert c["tokens"] == (n * 3 if method == "tga-zsr" else 0), c  # the training passes; the attack's do not
    if method.startswith("advflyp"):  # each step's own captions, once per step, never per attack iteration
        assert runs[3, 2]["text"] - runs[1, 1]["text"] == 2
    elif method == "fare":  # no labels, no text: only tracing the whole CLIP into model.pt runs the text encoder
        assert runs[3, 2]["text"] == runs[1, 1]["text"] == 1
    else:  # the class prompts, once per run
        assert runs[3, 2]["text"] == runs[1, 1]["text"]
    for n, k in runs:  # the benchmark numbers are in the log
        records = [json.loads(line) for line in open(tmp_path / f"{n}-{k}" / "log.jsonl")]
        records = [r for r in records if "img_per_s" in r]  # AdvFLYP adds an end-of-epoch record
        assert [r["step"] for r in records] == list(range(1, n + 1))
        assert all(r["img_per_s"] > 0 and r["s_per_step"] > 0 and r["peak_mem_mib"] > 0 for r in records)


def test_attack_forwards_per_batch_and_text_once_per_dataset(counter, tmp_path):
    """evaluate.py: per batch, one clean forward, then S gradient forwards for PGD / C&W (S + 1 for APGD, which also
    evaluates its start, and S input backwards: its last iterate's gradient would go unused; its most, counted with
    --no-early-exit: random weights fool most images at once) and one forward to classify x_adv; the class prompts
    are encoded once per dataset."""
    def run(steps):
        for k in counter:
            counter[k] = 0
        evaluate.main(["--model", "random:tiny", "--datasets", "synthetic,demo", "--samples", "6", "--batch-size",
                       "4", "--attacks", "pgd,cw,apgd-ce", "--attack-all", "--no-early-exit", "--steps", str(steps),
                       "--workers", "0",
                       "--out", str(tmp_path / f"r{steps}.json")])
        return dict(counter)

    one, three = run(1), run(3)
    batches = 2 * 2  # 6 images in batches of 4, two datasets
    for s, c in ((1, one), (3, three)):
        assert c["attack"] == batches * (s + s + (s + 1)), c
        assert c["backward"] == batches * (s + s + s), c
        assert c["frozen"] == batches * (1 + 3), c  # no-grad: clean + the final classification of each attack
        assert c["train"] == c["other"] == 0
    assert one["text"] == three["text"] == 2 + 1  # 1000 synthetic classes in two chunks of 500, 16 demo prompts
    report = json.load(open(tmp_path / "r3.json"))
    for name in ("synthetic", "demo"):
        assert set(report["img_per_s"][name]) == {"clean", "pgd", "cw", "apgd-ce"}
        assert all(v > 0 for v in report["img_per_s"][name].values())


# Encoder passes per batch inside each attack of Table 6 and AutoAttack's other two, with S = --steps (the attack table
# of docs/attacks.md): (forwards with autograd on, their input backwards, no-grad forwards). APGD-T and Square give
# their maximum, reached when no image is fooled (ε = 0); they stop attacking an image once it is fooled. A run of
# APGD evaluates S + 1 points and takes the gradient of the first S (the last one's would go unused).
ATTACK_PASSES = {
    **dict.fromkeys(["mi", "ni", "di", "ti", "pi", "pi++"], lambda s: (s, s, 0)),
    **dict.fromkeys(["mi-t", "ni-t", "di-t", "ti-t"], lambda s: (s, s, 1)),  # + 1 image: the number of classes
    "apgd-t": lambda s: (9 * (s + 1), 9 * s, 1 + 9),  # 9 targets × APGD; the clean ranking, survivors per target
    "apgd-ce-x5": lambda s: (5 * (s + 1), 5 * s, 4),  # 5 restarts of APGD; the survivors after each but the last
    "aa-ce-t": lambda s: (14 * (s + 1), 14 * s, 4 + 1 + 1 + 9),  # APGD-CE's 5 restarts, their survivors, APGD-T's
    "square": lambda s: (0, 0, s + 1),  # the stripes, then one candidate per iteration, gradient-free
    "square-aa": lambda s: (0, 0, s + 1),
}


@pytest.mark.slow
def test_table6_attack_passes_per_batch(counter):
    """zero_shot_eval on the demo CLIP at ε = 0 (every image survives, so APGD-T and Square make their most passes),
    each attack alone, S = 1 and 3, two batches."""
    model = common.load_clip("demo").requires_grad_(False)
    encoder = common.ImageEncoder(model.visual).eval()
    ds = common.DemoImages(common.DEMO_HELD_OUT, 1, 32, seed=2)
    text = common.text_features(model, common.prompts_for(ds.classes), torch.device("cpu"))
    data = torch.utils.data.Subset(ds, range(8))
    for name, passes in ATTACK_PASSES.items():
        for s in (1, 3):
            for k in counter:
                counter[k] = 0
            zero_shot_eval(encoder, text, data, common.Dist(0, 1, 0, torch.device("cpu")), (name,), 0.0,
                                  1 / 255, s, batch_size=4, attack_all=True)
            grad, backward, no_grad = passes(s)
            assert (counter["attack"], counter["backward"], counter["frozen"]) == (
                2 * grad, 2 * backward, 2 * (1 + no_grad + 1)), (name, s, counter)
            assert counter["train"] == counter["other"] == 0


def test_structure_metrics_reuse_the_evaluation_passes(counter, tmp_path):
    """--metrics all: the metrics read the features of the clean pass and of the classification of x_adv, so the
    only extra pass is the reference model's clean forward for top5-iou (none when the reference has the evaluated
    model's weights), plus its text features once per dataset (APGD's passes counted without early exit, as above)."""
    def run(reference):
        for k in counter:
            counter[k] = 0
        evaluate.main(["--model", "random:tiny", "--datasets", "synthetic,demo", "--samples", "6", "--batch-size", "4",
                       "--attacks", "pgd,cw,apgd-ce", "--attack-all", "--no-early-exit", "--steps", "2",
                       "--metrics", "all", "--reference-model", reference, "--workers", "0",
                       "--out", str(tmp_path / f"{reference}.json")])
        return dict(counter)

    batches = 2 * 2  # as above
    other, itself = run("demo"), run("random:tiny")  # random:tiny with the same --seed: the same weights
    for c, reference_passes, text in ((other, 1, 2 * (2 + 1)), (itself, 0, 2 + 1)):
        assert c["attack"] == batches * (2 + 2 + 3) and c["backward"] == batches * (2 + 2 + 2), c
        assert c["frozen"] == batches * (1 + reference_passes + 3), c
        assert c["train"] == c["other"] == 0 and c["text"] == text, c


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("agft.py", []), ("tecoa.py", ["--pmg"]), ("advflyp.py", []),
                                          ("fare.py", [])])
def test_benchmark_mode_runs(script, extra, tmp_path):
    """The benchmark command of docs/performance.md, with a tiny model and batch instead of ViT-B/32 and 256."""
    out = tmp_path / "bench"
    proc = run_script([script, "--model", "random:tiny", "--data", "synthetic", "--max-steps", "2", "--batch-size",
                       "8", "--synthetic-size", "16", "--log-every", "1", "--workers", "0", "--out", str(out), *extra])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in open(out / "log.jsonl") if '"img_per_s"' in line]
    assert len(records) == 2 and all(r["s_per_step"] > 0 for r in records)


@pytest.mark.slow
def test_evaluate_benchmark_mode_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(["evaluate.py", "--model", "random:tiny", "--datasets", "synthetic", "--samples", "8",
                       "--attacks", "pgd,aa", "--steps", "2", "--attack-all", "--workers", "0", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.load(open(out))
    assert report["datasets"]["synthetic"]["n"] == 8 and set(report["img_per_s"]["synthetic"]) == {"clean", "pgd", "aa"}
    assert report["settings"]["device"].startswith("cpu") and os.path.isfile(tmp_path / "bench.md")


@pytest.mark.slow
def test_compile_gives_the_same_weights(tmp_path):
    """--compile (torch.compile of the image encoders, compiled here by inductor on the CPU) trains the same model."""
    weights = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"run{len(extra)}"
        proc = run_script(["agft.py", "--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "16",
                           "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--out", str(out), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(common.read_checkpoint_weights(str(out / "last.pt")))
    assert json.load(open(tmp_path / "run1" / "args.json"))["compile"] is True
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-4, atol=1e-6)


def test_throughput_counts_only_the_steps_of_this_process_run(monkeypatch, tmp_path):
    """The benchmark clock starts at the first step of each run: after a resume from step 2, the first record covers
    one step, not the three since step 0 (which would inflate images/s threefold)."""
    steps_timed = []
    throughput = common.Run.throughput

    def spy(self, step, global_batch, device):
        steps_timed.append(step - self.steps_since)
        return throughput(self, step, global_batch, device)
    monkeypatch.setattr(common.Run, "throughput", spy)
    argv = ["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "16", "--batch-size", "4",
            "--workers", "0", "--log-every", "1", "--max-steps", "4", "--out", str(tmp_path / "run")]
    notices = iter([False, True])  # a preemption notice arrives during step 2: last.pt is saved at step 2
    monkeypatch.setattr(common.Preemption, "requested", lambda self, dist: next(notices, False))
    with pytest.raises(common.Preempted):
        agft.main(argv)
    agft.main(argv)  # resumes from last.pt at step 2
    assert steps_timed == [1, 1, 1, 1]
