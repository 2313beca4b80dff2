"""Running on a cluster (docs/cluster.md, issue 12): first launches that share caches, slow preparation on rank 0,
preemption (SIGTERM / SIGUSR1) and resume with another number of processes or nodes, resume refused under other
settings, unreadable training images, non-finite losses, fp16 attack gradients, BatchNorm backbones, datasets that
pickle, and torchrun's multi-node mode (two launches on this machine, gloo)."""
import hashlib
import http.server
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import agft
import common
import eval_datasets
import evaluate
import tecoa
from conftest import ROOT, SCRIPT_THREADS, load_weights, run_and_kill, run_main_in_process, run_script, tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TINY = ["--data", "synthetic", "--synthetic-size", "96", "--batch-size", "8", "--epochs", "2", "--warmup", "2",
        "--lr", "0.05", "--eps", "4", "--workers", "0", "--amp", "off", "--log-every", "1"]  # 24 steps


def env(**extra):
    return {**os.environ, **SCRIPT_THREADS, "PYTHONUNBUFFERED": "1", **extra}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_records(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def logged_steps(out):
    """The steps of the training records in log.jsonl (a preemption adds a record of its own)."""
    return [rec["step"] for rec in log_records(out) if "loss" in rec]


def run_and_signal(cmd, out, sig, after_step=3, group=False, timeout=180):
    """Start cmd in its own session, send `sig` once log.jsonl reaches `after_step` (to the first process, as a
    cluster's scheduler or torchrun signals it, or to the whole process group with group=True), wait for it to
    exit; returns (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    while len(logged_steps(out)) < after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stdout.read()[-3000:]
    (os.killpg if group else os.kill)(proc.pid, sig)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tmp_path_factory):
    """An uninterrupted one-process AGFT run of 24 steps."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    r = run_script(["agft.py", "--model", tiny_ckpt, *TINY, "--out", out])
    assert r.returncode == 0, r.stderr
    return load_weights(os.path.join(out, "last.pt"))


def assert_close_weights(a, b, exact=False):
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------- preemption and resume
@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_resume_is_exact(reference, tiny_ckpt, tmp_path):
    """SIGTERM, sent to the whole process group as a cluster does (DataLoader workers included): last.pt is saved
    at the step the run was at (not the last --save-every multiple), exit status 75; the rerun ends with the
    uninterrupted run's weights, bit for bit, and log.jsonl has each step once."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "agft.py", "--model", tiny_ckpt, *TINY, "--out", out, "--workers", "1"]
    code, output = run_and_signal(cmd, out, signal.SIGTERM, group=True)
    assert code == common.PREEMPTED, output[-3000:]
    step = torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"]
    assert 3 <= step < 24 and logged_steps(out)[-1] == step and "preempted (SIGTERM)" in output
    assert log_records(out)[-1] == {"step": step, "preempted": "SIGTERM"}  # what a batch script looks for
    assert not os.path.exists(os.path.join(out, "model.pt"))
    r = run_script(cmd[1:])
    assert r.returncode == 0, r.stderr
    assert logged_steps(out) == list(range(1, 25))
    assert_close_weights(reference, load_weights(os.path.join(out, "last.pt")), exact=True)


@pytest.mark.slow
def test_two_processes_preempted_by_sigusr1_resume_with_one(reference, tiny_ckpt, tmp_path):
    """torchrun passes SIGUSR1 on to its workers when told to (--signals-to-handle, as in docs/cluster.md's SLURM
    script); both ranks stop after the same step, rank 0 saves; one process resumes and ends where an
    uninterrupted run ends; steps replayed are not logged twice."""
    out = str(tmp_path / "run")
    args = ["agft.py", "--model", tiny_ckpt, *TINY, "--out", out]
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "--signals-to-handle",
                      "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"] + args
    code, output = run_and_signal(cmd, out, signal.SIGUSR1)
    assert code != 0 and "preempted (SIGUSR1)" in output, output[-3000:]
    assert output.count(f"exitcode  : {common.PREEMPTED}") + output.count(f"exit status {common.PREEMPTED}") >= 1
    step = torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"]
    assert 3 <= step < 24 and logged_steps(out)[-1] == step
    r = run_script(args)
    assert r.returncode == 0, r.stderr
    assert logged_steps(out) == list(range(1, 25))
    assert_close_weights(reference, load_weights(os.path.join(out, "last.pt")))


@pytest.mark.slow
def test_one_process_resumes_on_two_nodes(reference, tiny_ckpt, tmp_path):
    """torchrun's multi-node mode (two launches here, one process each, c10d rendezvous, gloo): a one-process run
    preempted mid-run resumes on 2 nodes and ends where the uninterrupted one-process run ends. Both processes are
    local rank 0 of their node, so both read (and would write) the shared caches: prepare_files orders them."""
    out = str(tmp_path / "run")
    args = ["agft.py", "--model", tiny_ckpt, *TINY, "--out", out]
    code, output = run_and_signal([sys.executable] + args, out, signal.SIGTERM)
    assert code == common.PREEMPTED, output[-3000:]
    port = free_port()
    nodes = [subprocess.Popen(TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
                                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                          "--rdzv-id=test"] + args,
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outputs
    assert "on 2 process(es)" in "".join(outputs) and logged_steps(out) == list(range(1, 25))
    assert_close_weights(reference, load_weights(os.path.join(out, "last.pt")))


# ------------------------------------------------------------------------------------ resume: the same run only
def test_resume_refuses_other_settings_and_another_methods_checkpoint(tmp_path, capsys):
    """A rerun with other trajectory flags stops with one line naming each flag and both values; another method's
    last.pt likewise; flags that do not change the result (workers, logging, saving) may change."""
    argv = ["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "16", "--batch-size", "4",
            "--workers", "0", "--max-steps", "2", "--out", str(tmp_path / "run")]
    agft.main(argv)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(saved["rng"]) == {"torch"}, "last.pt keeps only the CPU generator's state (no GPU states)"
    with pytest.raises(common.UsageError) as e:
        agft.main(argv + ["--lr", "0.1", "--gamma", "0.5", "--max-steps", "3"])
    message = str(e.value)
    for expected in ("--lr 0.0004 there, 0.1 now", "--gamma 0.4 there, 0.5 now", "--max-steps 2 there, 3 now",
                     "new --out"):
        assert expected in message, message
    assert "\n" not in message
    with pytest.raises(common.UsageError, match="checkpoint of a agft run, this is tecoa"):
        tecoa.main(argv)
    with pytest.raises(common.UsageError, match="--data images 16 there, 24 now"):
        agft.main(argv[:5] + ["24"] + argv[6:])
    assert torch.equal(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]["visual.proj"],
                       saved["model"]["visual.proj"]), "a refused rerun must not touch last.pt"
    agft.main(argv + ["--workers", "1", "--log-every", "7", "--save-every", "3"])  # allowed: same trajectory
    assert "resuming" in capsys.readouterr().out


def test_a_run_from_before_a_flag_existed_resumes_at_its_old_behaviour(tmp_path, capsys):
    """last.pt of a run written before --subset, --train, tecoa.py's --reg, ... existed (its args lack them) resumes
    under a command that leaves them at the value that was the only behaviour then; another value is refused."""
    argv = ["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "16", "--batch-size", "4",
            "--workers", "0", "--max-steps", "1", "--out", str(tmp_path / "run")]
    tecoa.main(argv)
    path = tmp_path / "run" / "last.pt"
    saved = torch.load(path, weights_only=True)
    old = {k: v for k, v in saved["args"].items() if k not in ("subset", "subset_per_class", "subset_order", "reg")}
    torch.save({**saved, "args": old}, path)  # as an older version wrote it
    with pytest.raises(common.UsageError, match="--reg none there, logit now"):
        tecoa.main(argv + ["--reg", "logit"])
    with pytest.raises(common.UsageError, match=r"--subset \(not set\) there, 8 now"):
        tecoa.main(argv + ["--subset", "8"])
    capsys.readouterr()
    tecoa.main(argv)
    assert "resuming" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ first launch on a node
class SlowRelease(http.server.BaseHTTPRequestHandler):
    """Serves `payload` slowly (as a large download is), counting requests."""
    payload, requests = b"", []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        for i in range(0, len(self.payload), 1 << 18):
            self.wfile.write(self.payload[i:i + (1 << 18)])
            time.sleep(0.02)

    def log_message(self, *a):
        pass


@pytest.mark.slow
def test_first_launch_downloads_the_released_weights_once(tmp_path):
    """Two ranks on an empty ~/.cache/clip: today's clip.load on every rank opens the same file for writing and one
    of them dies on the checksum. Rank 0 downloads (to a temporary name, renamed once the checksum is right), the
    other waits and reads it."""
    path = tmp_path / "release.pt"
    common.save_torchscript(tiny_clip(), str(path))
    SlowRelease.payload, SlowRelease.requests = path.read_bytes(), []
    sha = hashlib.sha256(SlowRelease.payload).hexdigest()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowRelease)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "tests/patched_launch.py", "evaluate.py",
                          "--model", "ViT-B/32", "--datasets", "demo", "--samples", "8", "--attacks", "none",
                          "--workers", "0", "--out", str(tmp_path / "eval.json")]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env(
            HOME=str(tmp_path / "home"), TEST_RELEASE_URL=f"http://127.0.0.1:{server.server_port}/{sha}/ViT-B-32.pt"))
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(SlowRelease.requests) == 1
    cache = tmp_path / "home" / ".cache" / "clip"
    assert os.listdir(cache) == ["ViT-B-32.pt"] and (cache / "ViT-B-32.pt").read_bytes() == SlowRelease.payload


@pytest.mark.slow
def test_first_launch_pretrains_the_demo_clip_once(tmp_path):
    """The demo CLIP's cache: one rank pretrains and writes it atomically, the other waits and reads it."""
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "tests/patched_launch.py", "evaluate.py", "--model",
                      "demo", "--datasets", "demo", "--samples", "8", "--attacks", "none", "--workers", "0",
                      "--out", str(tmp_path / "eval.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env(CLIP_AFT_CACHE=str(tmp_path / "cache"), TEST_DEMO_STEPS="5"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (r.stdout + r.stderr).count("pretraining the demo CLIP") == 1
    assert os.listdir(tmp_path / "cache") == [os.path.basename(common.demo_cache_path())]


@pytest.mark.slow
def test_slow_preparation_on_rank_0_does_not_time_out(tmp_path):
    """Rank 0 prepares evaluate.py's datasets (a download or an unpacking can take hours) while the others wait on
    the host-side group (Dist.cpu_group, SETUP_TIMEOUT), not in a collective of the default group, whose timeout
    (here 3 s, standing in for NCCL's 10 minutes) would kill them."""
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", "tests/patched_launch.py", "evaluate.py", "--model",
                      "demo", "--datasets", "demo", "--samples", "8", "--attacks", "none", "--workers", "0",
                      "--out", str(tmp_path / "eval.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env(TEST_PG_TIMEOUT_S="3", TEST_SLOW_DATASETS_S="8"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "eval.json"))["datasets"]["demo"]["n"] == 8


# ------------------------------------------------------------------------------------------------ bad images
def write_folder(root, n_per_class, corrupt=()):
    for c in ("cat", "dog"):
        for i in range(n_per_class):
            path = os.path.join(root, c, f"{i}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if (c, i) in corrupt:
                open(path, "wb").write(b"\xff\xd8 truncated jpeg")
            else:
                Image.fromarray(np.random.default_rng(i).integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(path)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["agft.py", "tecoa.py"])
def test_unreadable_training_images_are_replaced_and_counted(script, tmp_path):
    """ImageFolder data with a corrupt JPEG (2 of 24 images): replaced by the next readable image, counted in the
    log and on the console, in DataLoader workers too; today it kills the worker and the job. With the default
    --max-unreadable 0.01 the same data stops with one line."""
    data = str(tmp_path / "data")
    write_folder(data, 12, corrupt={("cat", 3), ("dog", 7)})
    args = [script, "--model", "random:tiny", "--data", data, "--batch-size", "4", "--epochs", "1", "--workers", "1",
            "--amp", "off", "--log-every", "3"]
    r = run_script(args + ["--out", str(tmp_path / "run"), "--max-unreadable", "0.1"])
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert records[-1]["step"] == 6 and records[-1]["unreadable_images"] == 2
    assert "epoch 0: 2 unreadable image(s)" in r.stdout
    r = run_script(args + ["--out", str(tmp_path / "strict")])
    assert r.returncode == 2 and "more than --max-unreadable 0.01" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------------------------- non-finite loss
def test_non_finite_loss_stops_without_writing_non_finite_weights(tmp_path):
    """An absurd learning rate makes the loss NaN: the run stops with one line naming the step and the last good
    checkpoint, and last.pt still holds finite weights (today it trains on and saves NaN weights)."""
    argv = ["--model", "random:tiny", "--data", "synthetic", "--synthetic-size", "64", "--batch-size", "4",
            "--workers", "0", "--amp", "off", "--save-every", "2", "--log-every", "100", "--lr", "1e12",
            "--warmup", "1", "--out", str(tmp_path / "run")]
    with pytest.raises(common.UsageError, match=r"^step \d+: the (loss|weights) (is|are) not finite") as e:
        agft.main(argv)
    assert "last checkpoint is" in str(e.value) or "no checkpoint was written yet" in str(e.value)
    if os.path.exists(tmp_path / "run" / "last.pt"):
        saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in saved.values())


# ------------------------------------------------------------------------------------------------ fp16 attacks
@pytest.fixture(scope="module")
def confident():
    """The demo CLIP and 32 held-out images it classifies with margins of 14 to 53 logits (scale 100)."""
    model = common.load_clip("demo")
    encoder = common.ImageEncoder(model.visual).eval()
    ds = common.DemoImages(common.DEMO_HELD_OUT, 2, 32, seed=2)
    x, y = torch.stack([ds[i][0] for i in range(32)]), torch.tensor([ds[i][1] for i in range(32)])
    text = common.text_features(model, common.prompts_for(ds.classes), "cpu")
    return encoder, x, y, text


def test_fp16_attack_gradients_do_not_underflow(confident):
    """Under fp16 autocast the plain input gradient of confidently classified images is exactly 0 (so PGD, which
    steps by its sign, never moves them); input_grad's per-sample scaling recovers the fp32 gradient's signs."""
    encoder, x, y, text = confident
    loss_fn = lambda xa: F.cross_entropy(100 * common.cosine_sim(encoder(xa), text), y, reduction="sum")  # noqa: E731
    reference = common.input_grad(loss_fn, x)  # fp32
    with torch.autocast("cpu", dtype=torch.float16):
        plain_x = x.clone().requires_grad_(True)
        plain, = torch.autograd.grad(loss_fn(plain_x), plain_x)  # unscaled, backward inside autocast
        scaled = common.input_grad(loss_fn, x)
    zero = lambda g: int((g.flatten(1).abs().amax(1) == 0).sum())  # noqa: E731
    assert zero(reference) == 0 and zero(plain) >= 24, "the unscaled fp16 gradient should underflow"
    assert zero(scaled) == 0
    agreement = (scaled.sign() == reference.sign()).float().flatten(1).mean(1)
    assert agreement.min() > 0.97, agreement
    torch.testing.assert_close(scaled, reference, rtol=0.1, atol=reference.abs().max().item() * 0.02)


def test_fp16_pgd_is_as_strong_as_fp32(confident):
    encoder, x, y, text = confident
    logits_fn = lambda xa: 100 * common.cosine_sim(encoder(xa), text)  # noqa: E731
    index = torch.arange(len(x))
    robust = {}
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)),
                      ("fp16", torch.autocast("cpu", dtype=torch.float16))):
        with ctx:
            x_adv = common.attack_pgd(logits_fn, x, y, index, 4 / 255, 1 / 255, 10, seed=0)
        with torch.no_grad():
            robust[name] = int((logits_fn(x_adv).argmax(-1) == y).sum())
    assert robust["fp32"] < 24 and abs(robust["fp16"] - robust["fp32"]) <= 2, robust


# ------------------------------------------------------------------------------------------ ResNet BatchNorm
@pytest.fixture(scope="module")
def tiny_rn_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rn") / "rn.pt")
    torch.manual_seed(0)
    torch.save({"model": common.CLIP(*common.ARCHITECTURES["tiny-rn"]).float().state_dict()}, path)
    return path


@pytest.mark.slow
def test_resnet_batchnorm_is_frozen_and_two_processes_equal_one(tiny_rn_ckpt, tmp_path):
    """CLIP's ResNet encoders have BatchNorm: fine-tuning keeps its statistics frozen (eval-mode BN), so the attack
    and the update see the same network, the running statistics never drift, and 2 processes train the weights of
    1 process (with per-rank batch statistics they would not)."""
    args = ["agft.py", "--model", tiny_rn_ckpt, "--data", "synthetic", "--synthetic-size", "32", "--batch-size", "8",
            "--max-steps", "3", "--warmup", "1", "--lr", "0.05", "--eps", "4", "--workers", "0", "--amp", "off"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, nproc in ((one, 1), (two, 2)):
        r = run_script(args + ["--out", out], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    start, w1, w2 = (load_weights(p)
                     for p in (tiny_rn_ckpt, os.path.join(one, "last.pt"), os.path.join(two, "last.pt")))
    stats = [k for k in start if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(start[k], w1[k]) for k in stats), "BatchNorm statistics drifted"
    assert not torch.equal(start["visual.attnpool.c_proj.weight"], w1["visual.attnpool.c_proj.weight"])
    assert_close_weights(w1, w2)


def test_image_encoder_train_mode_keeps_batchnorm_in_eval():
    encoder = common.ImageEncoder(common.load_clip("random:tiny-rn").visual).train()
    bn = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn) and encoder.visual.layer1.training


# -------------------------------------------------------------------------------------------- small things
@pytest.mark.slow
def test_datasets_pickle_for_spawned_dataloader_workers(tmp_path):
    """DataLoader workers started with `spawn` (macOS; `forkserver`, Linux's default from Python 3.14) get the
    dataset pickled: no lambdas in the datasets or their transforms."""
    data = str(tmp_path / "data")
    write_folder(data, 2)
    datasets = [common.training_dataset(data, 32)[0], common.training_dataset("synthetic", 32, synthetic_size=8)[0],
                common.caption_dataset("demo", 32), eval_datasets.eval_dataset(f"folder:{data}", ".", 32)[1],
                eval_datasets.eval_dataset("demo", ".", 32)[1]]
    for ds in datasets:
        pickle.loads(pickle.dumps(ds))
    loader = torch.utils.data.DataLoader(datasets[0], batch_size=2, num_workers=1, multiprocessing_context="spawn")
    images, labels, unreadable = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and unreadable.tolist() == [0, 0]


def test_gif_caption_pairs_and_folders_are_read(tmp_path):
    """One list of image extensions (it was defined twice, and .gif caption pairs were dropped)."""
    shard = tmp_path / "00000"
    shard.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(shard / "000000000.gif")
    (shard / "000000000.txt").write_text("a gif")
    assert common.find_caption_files(str(tmp_path)) == ([str(shard / "000000000.gif")], 0)
    assert len(common.image_folder(str(tmp_path), eval_datasets.native_transform())[0]) == 1


def test_demo_clip_is_the_same_whatever_the_callers_thread_count(tmp_path, monkeypatch):
    """The demo CLIP's pretraining is pinned to DEMO_PRETRAIN_THREADS: it runs at that count whatever the caller set
    (the caller's count is restored after), so from a caller at 1 thread and at 2 the same weights, bit for bit (the
    same ops at the same thread count round the same way). 6 steps."""
    before = torch.get_num_threads()
    pretrain, seen = common._pretrain_demo_clip, []
    monkeypatch.setattr(common, "_pretrain_demo_clip", lambda *a: seen.append(torch.get_num_threads()) or pretrain(*a))

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])
    try:
        pinned = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setenv("CLIP_AFT_CACHE", str(tmp_path / f"cache{threads}"))
            pinned.append(weights(common.demo_clip(6, log=lambda *a: None)))
            assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    assert seen == [common.DEMO_PRETRAIN_THREADS] * 2
    assert torch.equal(*pinned)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_weights(reference, tiny_ckpt, tmp_path):
    """SIGKILL (no chance to save) after a few steps: the rerun continues from the last --save-every checkpoint and
    ends with the uninterrupted run's weights, bit for bit (one process, the same ops in the same order)."""
    out = str(tmp_path / "killed")
    args = ["agft.py", "--model", tiny_ckpt, *TINY, "--save-every", "2", "--out", out]
    log = os.path.join(out, "log.jsonl")
    code = run_and_kill(args, lambda: os.path.exists(log) and sum(1 for _ in open(log)) >= 5)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "model.pt"))
    step_at_kill = torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"]
    assert 0 < step_at_kill < 24
    r = run_script(args)
    assert r.returncode == 0, r.stderr
    assert f"from step {step_at_kill}/24" in r.stdout
    assert_close_weights(reference, load_weights(os.path.join(out, "last.pt")), exact=True)


# ------------------------------------------------------------------------------------- one run per output at a time
@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_and_a_killed_one_blocks_nothing(tiny_ckpt, tmp_path, capsys):
    """Training and evaluation each hold a lock in their output (a POSIX lock on <run>/.lock, <out>.lock) while they
    run: a second run into the same --out stops with one line naming the first and writes nothing; once the first is
    killed (SIGKILL: no clean-up), the kernel has dropped its lock and the rerun goes on (training: it resumes)."""
    out = tmp_path / "run"
    train = ["--model", tiny_ckpt, *TINY, "--synthetic-size", "4000", "--save-every", "1", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "agft.py", *train], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not logged_steps(str(out)) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        writes = []  # every write of a run goes through atomic_write or Run.log
        with pytest.MonkeyPatch.context() as m:
            m.setattr(common, "atomic_write", lambda *a, **k: writes.append(a[0]))
            m.setattr(common.Run, "log", lambda self, record: writes.append(record))
            code, _, err = run_main_in_process(agft.main, train, capsys)
        assert code == 2 and f"error: --out {out}: process {first.pid} on " in err and err.count("\n") == 1, err
        assert "is writing there now" in err and writes == []
        r = run_script(["agft.py", *train], nproc=2, timeout=120)  # every rank stops, none waits for rank 0
        assert r.returncode != 0 and r.stderr.startswith(f"error: --out {out}: process {first.pid} on "), r.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    code, stdout, err = run_main_in_process(agft.main, train[:-2] + ["--max-steps", "3", "--out", str(out)], capsys)
    assert "is writing there now" not in err  # the killed run's lock is gone (here: --max-steps differs: refused)
    assert code == 2 and "--max-steps (not set) there, 3 now" in err, err

    result = tmp_path / "eval" / "r.json"
    evaluation = ["evaluate.py", "--model", tiny_ckpt, "--datasets", "synthetic", "--attacks", "pgd", "--steps", "50",
                  "--batch-size", "8", "--workers", "0", "--out", str(result)]
    first = subprocess.Popen([sys.executable, *evaluation], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    lock = str(result) + ".lock"
    try:
        deadline = time.time() + 120
        while not (os.path.exists(lock) and open(lock).read()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first evaluation ended early"
        code, _, err = run_main_in_process(evaluate.main, evaluation[1:], capsys)
        assert code == 2 and f"error: --out {result}: process {first.pid} on " in err and err.count("\n") == 1, err
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert common.hold_lock(lock, "the test") is not None  # free again


def test_without_file_locks_a_run_says_so_once_and_goes_on(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    code, stdout, err = run_main_in_process(agft.main, ["--model", tiny_ckpt, *TINY, "--max-steps", "1", "--out",
                                                        str(tmp_path / "run")], capsys)
    assert code == 0 and err.count("this filesystem has no file locks") == 1, err


def test_a_partial_last_line_in_log_jsonl_is_dropped_and_the_run_resumes(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """A crash mid-write (disk full, a node lost) leaves a line cut short at the end of log.jsonl: the rerun keeps
    the valid records and resumes."""
    out = tmp_path / "run"
    args = ["--model", tiny_ckpt, *TINY, "--max-steps", "4", "--save-every", "2", "--out", str(out)]
    requested, calls = common.Preemption.requested, []

    def notice_at_step_2(self, dist):
        calls.append(1)
        self.received = "SIGTERM" if len(calls) == 2 else self.received
        return requested(self, dist)
    monkeypatch.setattr(common.Preemption, "requested", notice_at_step_2)
    assert run_main_in_process(agft.main, args, capsys)[0] == common.PREEMPTED
    monkeypatch.undo()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # cut short
    code, stdout, err = run_main_in_process(agft.main, args, capsys)
    assert code == 0 and "resuming" in stdout, err
    assert [rec["step"] for rec in log_records(str(out))] == [1, 2, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("script,sig,status", [("agft.py", signal.SIGTERM, common.PREEMPTED),
                                               ("evaluate.py", signal.SIGTERM, common.PREEMPTED),
                                               ("agft.py", signal.SIGINT, 130)])
def test_a_signal_stops_the_demo_clips_pretraining_and_caches_nothing(script, sig, status, tmp_path):
    """The demo CLIP's first pretraining (a minute or two) stops at once on SIGTERM (exit 75, rerun to start it
    again) or SIGINT (130), in training and in evaluate.py (whose preemption flag is read only between batches), and
    leaves no partial cache; it shows its progress every 100 steps."""
    cache = tmp_path / "cache"
    argv = ["--demo"] if script == "agft.py" else ["--model", "demo", "--datasets", "demo"]
    proc = subprocess.Popen([sys.executable, script, *argv, "--out", str(tmp_path / "out")], cwd=ROOT,
                            env=env(CLIP_AFT_CACHE=str(cache)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert "pretraining the demo CLIP" in proc.stdout.readline()
    time.sleep(1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == status, stderr[-2000:]
    if sig == signal.SIGTERM:
        assert "preempted (SIGTERM) while pretraining the demo CLIP" in stdout and "Traceback" not in stderr
    assert not cache.exists() or list(cache.iterdir()) == []
