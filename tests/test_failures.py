"""Failure paths at the settings users run (DataLoader workers alive, one and two processes): every error, signal and
lost process ends the run within seconds with its line and exit status, leaves no process behind and keeps what was
saved. Every process test has a hard timeout (a hang is a failure) and checks that the run's process group is empty
afterwards (no orphan worker). docs/cluster.md names the exit statuses."""
import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, SCRIPT_THREADS, write_images

import common

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKERS = ["--workers", "2"]  # below the defaults (8 training, 4 evaluation), which usable_workers caps at 2 here


# ------------------------------------------------------------------------------------------------------ helpers
class Launched:
    """A script started in a session of its own (its DataLoader workers and torchrun's processes in its group)."""

    def __init__(self, cmd, **env):
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,
                                     env={**os.environ, **SCRIPT_THREADS, "PYTHONUNBUFFERED": "1", **env})

    def wait_until(self, ready, timeout=120):
        deadline = time.time() + timeout
        while not ready() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert self.proc.poll() is None, "ended before it could be disturbed: " + self.proc.stderr.read()[-3000:]
        if not ready():
            self.kill_all()  # a failed test leaves nothing running
            pytest.fail(f"not ready within {timeout} s")

    def kill_all(self):
        """SIGKILL to every process of the run (torchrun's ranks are in sessions of their own)."""
        for p in {*self.processes(), *getattr(self, "seen", [])}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    @staticmethod
    def table():
        """{pid: parent pid} of every live process (zombies have ended)."""
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z":
                    parents[int(entry)] = int(fields[1])
        return parents

    def processes(self):
        """The script and every process below it (its DataLoader workers; torchrun's processes, which run in
        sessions of their own, and their workers)."""
        parents, tree = self.table(), {self.proc.pid}
        grew = True
        while grew:
            below = {p for p, parent in parents.items() if parent in tree}
            grew = not below <= tree
            tree |= below
        return sorted(p for p in tree if p in parents)

    def children(self, pid):
        return sorted(p for p, parent in self.table().items() if parent == pid)

    def signal_all(self, sig):
        """`sig` to every process of the run, as SLURM signals every process of a job step."""
        for p in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)

    def end(self, timeout=60):
        """Wait for the exit (a hang fails the test, and the group is killed); then no process of the group may be
        left. Returns (exit status, stdout, stderr, seconds from `since`)."""
        try:
            stdout, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            stdout, stderr = self.proc.communicate()
            pytest.fail(f"still running {timeout} s later (a hang): {stdout[-1500:]} {stderr[-1500:]}")
        seconds = time.time() - self.since
        deadline = time.time() + 10
        alive = lambda: [p for p in self.seen if p in self.table()]  # noqa: E731
        while alive() and time.time() < deadline:
            time.sleep(0.05)
        left = alive()
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left behind: {left}"
        return self.proc.returncode, stdout, stderr, seconds

    def disturb(self, action):
        """Note every process of the run (none may outlive it), then do `action` (start the clock of end())."""
        self.seen = [p for p in self.processes() if p != self.proc.pid]
        self.since = time.time()
        action()


def ours(stderr):
    """What the scripts printed on stderr: the part before torchrun's own report (its log lines, its traceback)."""
    return re.split(r"^[EWI]\d{4} \d\d:\d\d", stderr, maxsplit=1, flags=re.M)[0]


def evaluation(folder, out, *extra):
    return ["evaluate.py", "--model", "{tiny}", "--datasets", f"folder:{folder}", "--attacks", "pgd",
            "--batch-size", "2", "--out", str(out), *extra]


def with_model(argv, tiny_ckpt):
    return [a.replace("{tiny}", tiny_ckpt) for a in argv]


def image_folder(root, n_per_class=6, classes=("cat", "dog")):
    write_images(str(root), [f"{c}/{i}.png" for c in classes for i in range(n_per_class)])
    return root


def done_images(samples):
    with np.load(samples, allow_pickle=False) as z:
        return int(np.unpackbits(z["0.done"]).sum())


# ------------------------------------------------------------------------------- in-process: the mechanisms
def test_signal_scopes_defer_interrupt_and_repeat(monkeypatch):
    """Deferred: a signal only sets the flag (and the status: 75, or 130 for SIGINT). Interruptible: Stop at once,
    also on entering after a signal. The same signal again within REPEAT_S is one request (torchrun forwards what
    the terminal sent too); a second SIGINT after that raises KeyboardInterrupt in any scope."""
    s = common.Preemption()
    s.start()
    try:
        s.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.received == "SIGTERM" and s.status == common.PREEMPTED  # deferred: the flag alone
        with pytest.raises(common.Stop) as stop:
            with s.interruptible("in a test"):
                pass
        assert stop.value.status == common.PREEMPTED and "preempted (SIGTERM) in a test" in str(stop.value)
        s.start()
        with pytest.raises(common.Stop) as stop:
            with s.interruptible("while working"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises between two Python operations
        assert stop.value.status == common.INTERRUPTED == 130
        s.start()
        s.defer()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same request, delivered twice
        assert s.received == "SIGINT"
        s.received_at -= s.REPEAT_S  # a second Ctrl-C, later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        s.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) is \
        signal.default_int_handler


@pytest.mark.parametrize("sig,when", [(signal.SIGTERM, "setup"), (signal.SIGINT, "setup"), (signal.SIGUSR1, "end")])
def test_run_main_honours_a_signal_in_every_phase(sig, when, capsys):
    """Setup (before the first step or batch): stopped at once. After the deferred part (a signal that no step
    boundary saw, e.g. during the final writes): the run ends its work, then exits with the signal's status all the
    same. The handlers from before come back."""
    before = signal.getsignal(sig)

    def main():
        if when == "end":
            common.SIGNALS.defer()  # a training loop, say
        os.kill(os.getpid(), sig)
        time.sleep(0.1)
        if when == "setup":
            raise AssertionError("not stopped")
        common.SIGNALS.defer(False)
    with pytest.raises(SystemExit) as exit_:
        common.run_main(main)
    status = common.INTERRUPTED if sig == signal.SIGINT else common.PREEMPTED
    what = "interrupted" if sig == signal.SIGINT else "preempted"
    phase = "during setup, with nothing new to save" if when == "setup" else "after finishing its work"
    assert exit_.value.code == status and f"{what} ({signal.Signals(sig).name}) {phase}" in capsys.readouterr().out
    assert signal.getsignal(sig) == before
    assert common.SIGNALS.received is None and common.SIGNALS.scopes == []  # nothing left for the next run


def test_stop_loaders_ends_workers_that_a_reference_keeps_alive():
    """An iterator kept alive (by an exception's traceback, or persistent workers) keeps its workers; stop_loaders
    ends them, as run_main does on every way out. Without it the process would wait for them at exit forever:
    they ignore SIGTERM."""
    data = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = common.Loader(data, batch_size=4, num_workers=2, worker_init_fn=common.worker_ignores_signals,
                           persistent_workers=True)  # as make_loader on CUDA
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    assert all(w.is_alive() for w in workers)
    os.kill(workers[0].pid, signal.SIGTERM)  # a cluster's signal: ignored by the worker
    time.sleep(0.3)
    assert workers[0].is_alive()
    common.stop_loaders()
    assert not any(w.is_alive() for w in workers)


def test_failures_of_the_machine_are_one_line_and_bugs_are_not():
    worker = RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
    assert "DataLoader worker (pid(s) 123) exited unexpectedly: a data-loading process ended" in \
        common.failure_message(worker)
    peer = RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1958")
    assert common.failure_message(peer).startswith("another process of this job ended (Connection closed by peer")
    caught = ValueError('Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call '
                        'last):\n  File "/x/worker.py", line 349, in _worker_loop\n    data = fetch(index)\n  File '
                        '"/x/common.py", line 12, in __getitem__\n    raise ValueError("bad")\nValueError: bad')
    assert common.failure_message(caught) == "ValueError: bad (in a DataLoader worker, at common.py:12); the saved " \
        "state is kept"
    assert common.failure_message(RuntimeError("shape mismatch")) is None
    assert common.failure_message(KeyError("x")) is None


def test_a_failed_write_names_the_path_and_errno_and_keeps_the_old_file(tmp_path):
    """A full disk during a write: one line with the path and ENOSPC; the file written before is intact and no
    temporary file is left (torch.save's own error hides the errno: the file object keeps it)."""
    path = tmp_path / "last.pt"
    common.atomic_save({"step": 1}, str(path))

    def fill_up(f):
        f.f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        torch.save({"w": torch.zeros(1000)}, f)
    with pytest.raises(common.UsageError, match=rf"cannot write {path}: No space left on device \(ENOSPC\)"):
        common.atomic_write(str(path), fill_up)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------------------------------------------- errors, workers alive
@pytest.mark.slow
@pytest.mark.parametrize("nproc,how", [(1, "truncated"), (2, "truncated"), (1, "deleted, --save-features")])
def test_an_unreadable_evaluation_image_ends_every_rank_at_once(nproc, how, tiny_ckpt, tmp_path):
    """Workers alive (the hang of the old code: the error line, then Python's exit waited for workers that ignore
    SIGTERM): exit 2 within seconds with the line naming the image, no process left, what was evaluated saved. Two
    processes: the rank that met the image and the other both stop (no one waits in a collective)."""
    folder = image_folder(tmp_path / "data")
    broken = folder / "dog" / "5.png"
    features = "--save-features" in how
    argv = evaluation(folder, tmp_path / "r.json", "--steps", "300" if features else "30", *WORKERS,
                      *(["--save-features", str(tmp_path / "f.npz")] if features else []))
    if how == "truncated":
        broken.write_bytes(broken.read_bytes()[:100])
    run = Launched(([sys.executable] if nproc == 1 else TORCHRUN) + with_model(argv, tiny_ckpt))
    if how == "truncated":
        run.disturb(lambda: None)
    else:  # removed while the evaluation runs (listed, not yet read)
        run.wait_until(lambda: len(run.processes()) >= 3)
        run.disturb(broken.unlink)
    code, stdout, stderr, _ = run.end(timeout=90)
    assert code == (2 if nproc == 1 else 1), stderr[-3000:]  # torchrun exits 1 once a rank failed
    line = [s for s in stderr.splitlines() if s.startswith("error")]
    assert line and line[0].startswith("error: data: image 11 cannot be read") and str(broken) in line[0], stderr
    assert "Traceback" not in ours(stderr)  # torchrun's own report may follow
    if features:
        assert not (tmp_path / "f.npz").exists()
    else:
        assert 0 < done_images(tmp_path / "r.samples.npz") < 12


@pytest.mark.slow
def test_an_unreadable_validation_image_stops_advflyp_with_workers(csv_data, tiny_ckpt, tmp_path):
    """AdvFLYP's early stopping validates at an epoch's end, inside training: one line, exit 2, no process left
    (the old code hung here and ignored SIGTERM)."""
    folder = image_folder(tmp_path / "val", n_per_class=3)
    (folder / "cat" / "1.png").write_bytes(b"broken")
    run = Launched([sys.executable, "advflyp.py", "--model", tiny_ckpt, "--data", csv_data, "--batch-size", "4",
                    "--epochs", "1", "--warmup", "1", "--eps", "1", "--amp", "off", "--patience", "1",
                    "--val-data", str(folder), "--val-size", "6", "--val-steps", "1", "--max-unreadable", "0.5",
                    *WORKERS,
                    "--out", str(tmp_path / "run")])
    run.disturb(lambda: None)
    code, _, stderr, _ = run.end(timeout=90)
    assert code == 2 and stderr.startswith("error: ") and "cannot be read" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("script,nproc", [("agft.py", 1), ("evaluate.py", 2)])
def test_a_killed_worker_ends_the_run_with_one_line(script, nproc, tiny_ckpt, tmp_path):
    """SIGKILL to a DataLoader worker (the out-of-memory killer): the run ends within seconds, exit status non-zero
    with a line naming the worker (every rank: the other one loses its peer), no process left, last.pt or the
    per-image results kept."""
    if script == "agft.py":
        out = tmp_path / "run"
        argv = ["agft.py", "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "4000", "--batch-size",
                "8", "--epochs", "1", "--eps", "1", "--amp", "off", "--save-every", "2", "--out", str(out), *WORKERS]
        ready = lambda: (out / "last.pt").exists()  # noqa: E731
    else:
        folder = image_folder(tmp_path / "data", n_per_class=20)
        argv = with_model(evaluation(folder, tmp_path / "r.json", "--steps", "20", "--save-every", "0", *WORKERS),
                          tiny_ckpt)
        ready = lambda: (tmp_path / "r.samples.npz").exists()  # noqa: E731
    run = Launched(([sys.executable] if nproc == 1 else TORCHRUN) + argv)
    run.wait_until(ready)
    rank = run.proc.pid if nproc == 1 else sorted(run.children(run.proc.pid))[-1]  # torchrun's last process
    worker = run.children(rank)[0]
    run.disturb(lambda: os.kill(worker, signal.SIGKILL))
    code, _, stderr, seconds = run.end(timeout=60)
    assert code == common.FAILED, stderr[-3000:]
    assert f"DataLoader worker (pid(s) {worker}) exited unexpectedly" in stderr or \
        f"DataLoader worker (pid {worker}) is killed by signal" in stderr, stderr[-3000:]
    assert "rerun the same command to resume" in stderr and seconds < 30
    if script == "agft.py":
        assert "Traceback" not in stderr
        assert torch.load(out / "last.pt", weights_only=True)["step"] >= 2
    else:
        assert "another process of this job ended" in stderr  # rank 0, whose peer went
        assert done_images(tmp_path / "r.samples.npz") > 0


# ----------------------------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_ctrl_c_in_training_with_workers_saves_the_current_step_and_exits_130(tiny_ckpt, tmp_path):
    """SIGINT to the process group (Ctrl-C in a terminal, workers included): last.pt at the step in hand, exit 130,
    no process left (the old code exited 130 without saving). The rerun resumes as after SIGTERM (test_cluster)."""
    out = tmp_path / "run"
    argv = ["agft.py", "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "4000", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "400", "--eps", "1", "--amp", "off", "--log-every", "1",
            "--out", str(out), *WORKERS]
    run = Launched([sys.executable] + argv)
    log = out / "log.jsonl"
    run.wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3)
    run.disturb(lambda: os.killpg(run.proc.pid, signal.SIGINT))
    code, stdout, stderr, seconds = run.end(timeout=60)
    assert code == common.INTERRUPTED == 130, stderr[-3000:]
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    assert f"interrupted (SIGINT) after step {step}/400" in stdout and seconds < 10
    records = [r for r in log.read_text().splitlines() if "preempted" in r]
    assert records == [f'{{"step": {step}, "preempted": "SIGINT"}}']


@pytest.mark.slow
@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_a_signal_in_a_long_evaluation_batch_saves_and_stops_within_seconds(nproc, sig, tiny_ckpt, tmp_path):
    """A signal in the middle of a batch (here PGD-400 on one image: a second or more; on a GPU a 1000-image
    AutoAttack batch runs for minutes) is honoured between two attack iterations: the batches before it are saved, the one in hand is thrown away, exit 130 (SIGINT) or 75, no
    process left. Ctrl-C reaches the terminal's process group (the script and its workers); SIGTERM goes to every
    process, as SLURM sends it, so that the ranks get it twice (from SLURM and from torchrun)."""
    folder = image_folder(tmp_path / "data", n_per_class=8)
    samples = tmp_path / "r.samples.npz"
    steps = {"pgd": 400}
    argv = with_model(evaluation(folder, tmp_path / "r.json", "--steps", str(steps["pgd"]), "--save-every", "0",
                                 "--batch-size", "1", *WORKERS), tiny_ckpt)
    run = Launched(([sys.executable] if nproc == 1 else TORCHRUN) + argv)
    if nproc == 1:  # a batch saved, then into the next one's attack
        run.wait_until(lambda: samples.exists() and done_images(samples) > 0, timeout=240)
        time.sleep(0.5)
    else:  # both ranks attacking (with more threads than cores a first batch can take minutes: do not wait for it)
        run.wait_until(lambda: len(run.processes()) >= 7)  # torchrun, 2 ranks, 2 workers each
        time.sleep(3)
    run.disturb(lambda: os.killpg(run.proc.pid, sig) if nproc == 1 else run.signal_all(sig))
    code, stdout, stderr, seconds = run.end(timeout=60)
    status = common.INTERRUPTED if sig == signal.SIGINT else common.PREEMPTED
    if nproc == 1:
        assert code == status, stderr[-3000:]
    else:  # torchrun ends with its own SignalException (exit status 1); the ranks' status is in the line below
        assert code != 0, stderr[-3000:]
    assert f"exit status {status}" in stdout and "Traceback" not in ours(stderr)
    assert (0 if nproc == 2 else 1) <= done_images(samples) < 16 and seconds < 15, (seconds, stdout)


# ------------------------------------------------------------------------------------------ a lost process
@pytest.mark.slow
def test_kill_9_of_one_rank_ends_the_job_within_seconds_and_the_rerun_resumes(tiny_ckpt, tmp_path):
    """SIGKILL to rank 1 (a node lost, the OOM killer): rank 0 finds its peer gone in its next collective (gloo
    reports the closed connection) and ends with one line, torchrun ends the job; the same command resumes."""
    out = tmp_path / "run"
    argv = ["agft.py", "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "4000", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "300", "--eps", "1", "--amp", "off", "--save-every", "2",
            "--log-every", "1", "--out", str(out), *WORKERS]
    run = Launched(TORCHRUN + argv)
    run.wait_until(lambda: (out / "last.pt").exists())
    rank1 = sorted(run.children(run.proc.pid))[-1]
    run.disturb(lambda: os.kill(rank1, signal.SIGKILL))
    code, _, stderr, seconds = run.end(timeout=90)
    assert code != 0 and seconds < 45, (seconds, stderr[-3000:])
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert "another process of this job ended" in stderr, stderr[-3000:]  # rank 0's line, not a gloo traceback
    run = Launched([sys.executable] + argv)  # the same command, one process: it resumes; stopped once it has
    log = out / "log.jsonl"
    run.wait_until(lambda: any(f'"step": {saved + 1},' in line for line in log.read_text().splitlines()))
    run.disturb(lambda: os.killpg(run.proc.pid, signal.SIGTERM))
    code, stdout, _, _ = run.end(timeout=60)
    assert code == common.PREEMPTED and f"resuming {out} from step {saved}/300" in stdout, stdout[-2000:]


# --------------------------------------------------------------------------------- a full or read-only --out
def mounted(tmp_path, options):
    """A command prefix that runs its command in a mount namespace of its own with a tmpfs at tmp_path/fs
    (`options`: its size, ro): a real full or read-only filesystem, without touching the machine's. Skips where
    mount namespaces are not allowed."""
    fs = tmp_path / "fs"
    fs.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {fs}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (unshare -m: {probe.stderr.strip()[:100]})")
    return fs, ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs {fs} && exec "$@"', "sh"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_partial_file(nproc, tiny_ckpt, tmp_path):
    """ENOSPC while writing last.pt (workers alive): one line naming the file and the errno, exit 2, no temporary
    or half-written file, no process left (the old code: torch's 'unexpected pos' traceback, then a hang). Two
    processes: rank 0 writes and stops; rank 1 finds it gone in the next collective and stops with its own line."""
    fs, prefix = mounted(tmp_path, "size=600k")
    out = fs / "run"
    run = Launched(prefix + ([sys.executable] if nproc == 1 else TORCHRUN) + [
        "agft.py", "--model", tiny_ckpt, "--data", "synthetic", "--synthetic-size", "64", "--batch-size", "8",
        "--max-steps", "4", "--eps", "1", "--amp", "off", "--save-every", "2", "--out", str(out), *WORKERS])
    run.disturb(lambda: None)
    code, _, stderr, _ = run.end(timeout=90)
    lines = ours(stderr).splitlines()
    assert code == (2 if nproc == 1 else 1), stderr[-3000:]
    assert lines[0] == f"error: cannot write {out}/last.pt: No space left on device (ENOSPC); what was saved before " \
        "is kept", stderr[-3000:]
    assert "Traceback" not in ours(stderr)
    if nproc == 1:
        assert len(lines) == 1
    else:  # rank 1 says it lost rank 0, unless torchrun's SIGTERM ended it first
        assert all(line.startswith("error (rank 1): another process of this job ended") for line in lines[1:]), lines


@pytest.mark.slow
def test_a_read_only_out_is_one_line_and_writes_nothing(tiny_ckpt, tmp_path):
    fs, prefix = mounted(tmp_path, "ro")
    folder = image_folder(tmp_path / "data", n_per_class=2)
    run = Launched(prefix + [sys.executable] + with_model(evaluation(folder, fs / "r.json", *WORKERS), tiny_ckpt))
    run.disturb(lambda: None)
    code, _, stderr, _ = run.end(timeout=90)
    assert code == 2 and stderr == f"error: cannot write {fs}/r.json: Read-only file system (EROFS); what was saved " \
        "before is kept\n", stderr[-3000:]
