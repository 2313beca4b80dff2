"""Every training script end to end, with tiny settings, the same checks for each (docs/tests.md): the run directory
it writes, the image encoder alone trained, model.pt readable by clip.load and exactly by common.load_clip, a
preempted run resumed to the uninterrupted weights, two processes following one (torchrun, gloo), the demo, and bad
input as one line with nothing written. The run directory's machinery (common.Run) is tested thoroughly once, in
test_cluster.py; each method's own behaviour in its own file."""
import json
import os

import clip
import numpy as np
import pytest
import torch

import advflyp
import agft
import common
import fare
import tecoa
from conftest import load_weights, run_demo_reduced, run_main_in_process, run_script

pytestmark = pytest.mark.usefixtures("one_thread")

# id: (script, its flags, the method name it records, the demo table's label, learning rate of the tiny run)
SCRIPTS = {
    "agft": ("agft.py", [], "agft", "AGFT", "0.05"),
    "tecoa": ("tecoa.py", [], "tecoa", "TeCoA", "0.05"),
    "pmg-aft": ("tecoa.py", ["--pmg"], "pmg-aft", "PMG-AFT", "0.05"),
    # TGA-ZSR at 0.05 is chaotic on this tiny run (min-max maps, unsquared norms): weights perturbed by 1e-7 ended
    # 6e-4 apart after 12 steps, so 1 and 2 processes could not be compared; at 0.01 they stay close and still move
    "tga-zsr": ("tecoa.py", ["--tga"], "tga-zsr", "TGA-ZSR", "0.01"),
    "advflyp": ("advflyp.py", [], "advflyp", "AdvFLYP", "0.05"),
    "fare": ("fare.py", ["--attack-steps", "2"], "fare", "FARE", "0.001"),
}
MAINS = {"agft.py": agft.main, "tecoa.py": tecoa.main, "advflyp.py": advflyp.main, "fare.py": fare.main}
STEPS = 12  # 24 synthetic images in global batches of 4, 2 epochs


def argv(name, model, out, *extra):
    script, flags, _, _, lr = SCRIPTS[name]
    return [*flags, "--model", model, "--data", "synthetic", "--synthetic-size", "24", "--batch-size", "4",
            "--epochs", "2", "--lr", lr, "--warmup", "1", "--eps", "4", "--workers", "0", "--amp", "off",
            "--log-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tmp_path_factory):
    """Each script's uninterrupted tiny run, in this process: {id: run directory}, made on first use."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name):
        if name not in done:
            MAINS[SCRIPTS[name][0]](argv(name, tiny_ckpt, root / name))
            done[name] = str(root / name)
        return done[name]
    return run


@pytest.mark.parametrize("name", SCRIPTS)
def test_run_writes_its_directory_and_trains_the_image_encoder_only(runs, tiny_ckpt, name):
    out = runs(name)
    names = set(os.listdir(out))
    assert {"args.json", "log.jsonl", "last.pt", "model.pt", "model_state_dict.pt"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    assert json.load(open(os.path.join(out, "args.json")))["method"] == SCRIPTS[name][2]
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and all(np.isfinite(r["loss"]) for r in records)
    assert {"step", "epoch", "loss", "lr", "img_per_s", "s_per_step", "peak_mem_mib"} <= set(records[0])
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["step"] == STEPS and {"model", "optimizer", "scaler", "scheduler", "rng", "args"} <= set(ckpt)
    start, final = load_weights(tiny_ckpt), ckpt["model"]
    assert max((final[k] - start[k]).abs().max().item() for k in start if k.startswith("visual.")) > 1e-4
    assert all(torch.equal(final[k], start[k]) for k in start if not k.startswith("visual."))


@pytest.mark.parametrize("name", SCRIPTS)
def test_model_pt_loads_with_clip_load_and_exactly_with_common(runs, name):
    """model.pt is a TorchScript archive that clip.load reads without this project (it rounds the weight matrices to
    fp16, as for OpenAI's releases); common.load_clip keeps every weight, as does model_state_dict.pt."""
    out = runs(name)
    trained = load_weights(os.path.join(out, "last.pt"))
    model, _ = clip.load(os.path.join(out, "model.pt"), device="cpu", jit=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]) or torch.equal(v, trained[k].half().float()), k
    exact = common.load_clip(os.path.join(out, "model.pt")).state_dict()
    plain = torch.load(os.path.join(out, "model_state_dict.pt"), weights_only=True)
    assert all(torch.equal(exact[k], v) and torch.equal(plain[k], v) for k, v in trained.items())


@pytest.mark.parametrize("name", SCRIPTS)
def test_preempted_run_resumes_to_the_uninterrupted_weights(runs, tiny_ckpt, tmp_path, monkeypatch, capsys, name):
    """A preemption notice after step 5: last.pt at step 5, exit status 75; the same command again ends with the
    uninterrupted run's weights, bit for bit (one process, the same ops in the same order), and one log record per
    step. (Signals, kill -9, other process counts: test_cluster.py.)"""
    requested, calls = common.Preemption.requested, []

    def notice_at_step_5(self, dist):
        calls.append(1)
        if len(calls) == 5:
            self.received = "SIGTERM"
        return requested(self, dist)
    monkeypatch.setattr(common.Preemption, "requested", notice_at_step_5)
    main, args = MAINS[SCRIPTS[name][0]], argv(name, tiny_ckpt, tmp_path / "run")
    code, stdout, _ = run_main_in_process(lambda a: main(a), args, capsys)
    assert code == common.PREEMPTED and "preempted (SIGTERM) after step 5" in stdout
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 5
    monkeypatch.undo()
    code, stdout, _ = run_main_in_process(lambda a: main(a), args, capsys)
    assert code == 0 and "resuming" in stdout
    a, b = load_weights(os.path.join(runs(name), "last.pt")), load_weights(tmp_path / "run" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 5, *range(6, STEPS + 1)]  # step 5's preemption record, then the rest


def test_a_one_step_run_says_so_in_the_singular(tiny_ckpt, tmp_path, capsys):
    code, stdout, _ = run_main_in_process(tecoa.main, argv("tecoa", tiny_ckpt, tmp_path / "one", "--max-steps", "1"),
                                          capsys)
    assert code == 0 and "TeCoA: 24 images, 1000 classes, 1 step of global batch 4" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_two_processes_follow_one(runs, tiny_ckpt, tmp_path, name):
    """torchrun --nproc_per_node=2 (gloo) with the same global batch follows the one-process run: the losses agree,
    and the two trained encoders' embeddings differ by under 0.1% of how far training moved them (weights are not
    compared one by one: some, such as the attention's key biases, get a gradient that is 0 in exact arithmetic and
    float noise in practice, which Adam turns into steps of ±lr that change no output)."""
    out = tmp_path / "two"
    r = run_script([SCRIPTS[name][0], *argv(name, tiny_ckpt, out)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one = runs(name)
    losses = lambda p: [json.loads(line)["loss"] for line in open(os.path.join(p, "log.jsonl"))]  # noqa: E731
    np.testing.assert_allclose(losses(one), losses(out), rtol=1e-3)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        weights = (load_weights(tiny_ckpt), load_weights(os.path.join(one, "last.pt")), load_weights(out / "last.pt"))
        start, a, b = (common.clip_from_state_dict(w).encode_image(x) for w in weights)
    moved, diff = (a - start).abs().max().item(), (a - b).abs().max().item()
    assert diff < 1e-3 * moved, (moved, diff)


@pytest.mark.parametrize("name", SCRIPTS)
def test_demo_reduced(name, tmp_path, capsys, monkeypatch):
    """`SCRIPT --demo` with 2 training steps and every 32nd test image: the demo CLIP, the demo's settings (the same
    learning rate for every method), the before/after table, results.json and the picture."""
    script, flags, method, label, _ = SCRIPTS[name]
    results = run_demo_reduced(MAINS[script], [*flags, "--max-steps", "2"], tmp_path / "demo", monkeypatch,
                               figure=name == "agft")  # figures.py's process once: the others check the line
    stdout = capsys.readouterr().out
    assert f"after ({label})" in stdout and "before (original CLIP)" in stdout
    assert any(line.startswith((f"{label}:", f"{label} (")) and "2 steps of global batch 64" in line
               for line in stdout.splitlines())  # the run's first line, with the method's name as the paper spells it
    assert results["method"] == method and results["after"]["n"] == results["before"]["n"] == 16
    assert results["before"]["clean"] > 80, "the pretrained demo CLIP should classify held-out concepts zero-shot"
    assert set(results["held_out_concepts"]).isdisjoint(results["proxy_concepts"])
    for row in (results["before"], results["after"], results["proxy"]["before"], results["proxy"]["after"]):
        assert set(row) == {"n", "clean", "pgd"} and 0 <= row["pgd"] <= row["clean"] <= 100
    assert json.load(open(tmp_path / "demo" / "args.json"))["lr"] == 1e-3
    picture = tmp_path / "demo" / "demo.png"  # the demo's last line: the picture of its table (figures.py demo)
    if name == "agft":
        assert stdout.rstrip().splitlines()[-2] == f"figure: {picture}"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert stdout.rstrip().splitlines()[-2] == f"figure: (not drawn) {picture}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_is_one_line_and_writes_nothing(name, tiny_ckpt, tmp_path, capsys):
    corrupt, taken = tmp_path / "corrupt.pt", tmp_path / "taken"
    corrupt.write_bytes(b"\x00garbage")
    taken.write_text("precious")
    cases = {
        "--eps -1.0: must be >= 0": ["--eps", "-1"],
        "--model /nonexistent/model.pt: no such file": ["--model", "/nonexistent/model.pt"],
        "unreadable checkpoint": ["--model", str(corrupt)],
        "--batch-size 0: must be >= 1": ["--batch-size", "0"],
    }
    main = MAINS[SCRIPTS[name][0]]
    for message, extra in cases.items():
        out = tmp_path / "out"
        code, _, stderr = run_main_in_process(main, argv(name, tiny_ckpt, out, *extra), capsys)
        assert code == 2 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr and not out.exists(), (message, stderr)
    code, _, stderr = run_main_in_process(main, argv(name, tiny_ckpt, taken), capsys)
    assert code == 2 and "exists and is not a directory" in stderr and taken.read_text() == "precious"


@pytest.mark.slow
def test_an_error_on_the_command_line_is_one_line_without_traceback(tiny_ckpt, tmp_path):
    """What common.run_main does for every script, in a real process: `error: ...` on stderr, exit status 2."""
    r = run_script(["agft.py", *argv("agft", tiny_ckpt, tmp_path / "out", "--gamma", "1.5")])
    assert r.returncode == 2 and r.stderr.strip() == "error: --gamma 1.5: must be in (0, 1]", r.stderr
    assert not (tmp_path / "out").exists()
