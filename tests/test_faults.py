"""Faults injected for real: SIGTERM (preemption), SIGKILL during a checkpoint write, a rank killed under
torchrun --max-restarts, a diverging run, corrupt files in a training set, a spoilt ckpt.pt, a disk or
folder that refuses a save (full, read-only, gone, no permission), also under torchrun; loader workers
killed, stopped or stuck on a read that never returns, also under torchrun; log.jsonl and eval.json refused."""

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import data
import eval as evaluate
import runtime
import train
from helpers import signal_the_reader, spoil
from media import image_set_with_a_stall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--recipe", "demo", "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "2", "--log_every", "1", "--eval_every", "0",
        "--final_eval", "none", "--workers", "0"]


def run_train(args, env=None):
    return subprocess.Popen([sys.executable, "train.py"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(cond, timeout=120, proc=None):
    t = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError("process ended early:\n" + proc.stdout.read()[-3000:])
        if time.time() - t > timeout:
            raise TimeoutError
        time.sleep(0.2)


def torchrun_to_the_end(script, args, **env):
    """`script` under torchrun with 2 processes -> (exit status, output); every rank must exit within 240 s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    try:
        text = p.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the agent and every worker: nothing may outlive the test
        raise AssertionError("a rank did not exit:\n" + p.communicate()[0][-4000:]) from None
    return p.returncode, text


def logged_steps(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if '"loss"' in line]


def test_sigterm_saves_and_exits_zero_then_resumes(demo_dir, tmp_path):
    out = str(tmp_path / "run")
    args = FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "100000", "--save_every", "100000"]
    p = run_train(args)
    wait_for(lambda: len(logged_steps(out)) >= 3, proc=p)
    p.send_signal(signal.SIGTERM)
    text = p.communicate(timeout=120)[0]
    assert p.returncode == 0, text[-2000:]
    assert "SIGTERM" in text
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert 3 <= step < 100000
    # the same command again continues by itself (here told to stop two steps later)
    p = run_train(args + ["--stop_at", str(step + 2)])
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text[-2000:]
    assert f"resuming from {out}/ckpt.pt (step {step})" in text
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == step + 2


def test_sigkill_leaves_no_worker_processes(demo_dir, tmp_path):
    """A killed run must not leave its DataLoader workers (and their fork server) running for ever: on a
    cluster they would hold memory and /dev/shm, and under torchrun they keep the job's output open."""
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "train.py"] + FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps",
                         "100000", "--workers", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # its own process group: pgrep -g finds everything it started
    group = lambda: subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()  # noqa: E731
    try:
        wait_for(lambda: len(logged_steps(out)) >= 3, proc=p)
        assert len(group()) >= 3  # train.py, the fork server and its workers
        p.kill()
        p.wait()
        wait_for(lambda: not group(), timeout=15)
    finally:
        subprocess.run(["pkill", "-9", "-g", str(p.pid)])


_WRITER = """
import sys, torch, runtime
files = runtime.CheckpointFiles(sys.argv[1])
files.save({"step": 1, "w": torch.ones(10)})
print("first", flush=True)
files.save({"step": 2, "w": torch.randn(100_000_000)})  # 400 MB: takes a while to write
print("second", flush=True)
"""


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "first"
    wait_for(lambda: any(f.startswith("ckpt.pt.tmp") for f in os.listdir(tmp_path)), timeout=60)
    time.sleep(0.05)
    p.kill()  # SIGKILL while the second checkpoint is being written
    p.wait()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous one, intact
    assert not os.path.exists(tmp_path / "ckpt.prev.pt")  # renamed aside only once the new one is whole


def test_rank_killed_under_torchrun_restarts_and_continues(demo_dir, tmp_path):
    """The launch the README gives for --max-restarts: with torchrun's shared store the restarted ranks read
    the dead ranks' addresses and fail to connect (pytorch#135712), hence TORCH_DISABLE_SHARE_RDZV_TCP_STORE."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=3",
           "train.py"] + FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "60", "--save_every", "5",
                                 "--workers", "1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                         start_new_session=True)
    ckpt = os.path.join(out, "ckpt.pt")

    def saved_step():
        try:
            return torch.load(ckpt, weights_only=True)["step"]
        except Exception:
            return 0

    wait_for(lambda: saved_step() >= 5, timeout=240, proc=p)
    workers = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "train.py"], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    try:
        text = p.communicate(timeout=400)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the agent and every worker: nothing may outlive the test
        raise AssertionError("no exit after the kill:\n" + "\n".join(
            line[:300] for line in p.communicate()[0].splitlines() if "it/s" not in line)[-6000:]) from None
    assert p.returncode == 0, "\n".join(line[:300] for line in text.splitlines() if "it/s" not in line)[-6000:]
    resumed = [int(s) for s in re.findall(r"resuming from \S+ckpt\.pt \(step (\d+)\)", text)]
    assert len(resumed) == 1 and resumed[0] >= 5  # one restart, from the checkpoint (not from step 0)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in text  # launched as the README says: no warning
    steps = logged_steps(out)
    assert steps[-1] == 60 and set(steps) == set(range(1, 61))  # steps before the kill may be logged twice


def test_diverging_run_stops_with_step_and_dataset(demo_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "50", "--save_every", "1",
                           "--optimizer", "sgd", "--lr", "1e12", "--warmup_steps", "0", "--clip_grad", "0"])
    msg = str(e.value)
    assert "loss is" in msg and "at step" in msg and "on dataset demo_" in msg
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # the last good one
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["step"] == int(msg.split("at step ")[1].split()[0])


def test_corrupt_files_are_replaced_and_counted(tmp_path):
    """A custom video set with zero-byte, garbage and truncated files trains on, with the count logged."""
    root = tmp_path / "data" / "mine"
    lines = {"train": [], "val": []}
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            path = root / split / f"{i}.avi"
            path.parent.mkdir(parents=True, exist_ok=True)
            w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12, (40, 40))
            for _ in range(10):
                w.write(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            w.release()
            lines[split].append(f"{split}/{i}.avi {i % 2}")
    (root / "train" / "0.avi").write_bytes(b"")  # zero bytes
    (root / "train" / "1.avi").write_bytes(b"not a video at all" * 100)  # garbage
    data_bytes = (root / "train" / "2.avi").read_bytes()
    (root / "train" / "2.avi").write_bytes(data_bytes[:200])  # truncated inside the first frame
    lines["train"].append("train/missing.avi 0")  # listed, not on disk
    for split in lines:
        (root / f"{split}.csv").write_text("\n".join(lines[split]) + "\n")
    out = tmp_path / "out"
    train.main(FAST + ["--datasets", "mine", "--data_dir", str(tmp_path / "data"), "--out_dir", str(out),
                       "--model", "demo", "--img_size", "32", "--max_steps", "12", "--batch_size", "4"])
    last = [json.loads(line) for line in open(out / "log.jsonl") if '"failed"' in line][-1]
    assert last["step"] == 12 and last["failed"]["mine"] > 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["failed"]["mine"] == last["failed"]["mine"]


def test_dataset_with_no_readable_sample_stops_clearly(tmp_path):
    root = tmp_path / "data" / "broken"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(3):
            (root / split / "a" / f"{i}.mp4").write_bytes(b"\x00" * 64)
    # a step that reads nothing trains nothing and the run goes on, unless the dataset never read a sample
    with pytest.raises(SystemExit, match="no sample of broken could be read in its first 10 steps"):  # every rank
        train.main(FAST + ["--datasets", "broken", "--data_dir", str(tmp_path / "data"), "--out_dir",
                           str(tmp_path / "out"), "--model", "demo", "--img_size", "32", "--max_steps", "12"])


# ---- the disk: a spoilt ckpt.pt falls back to ckpt.prev.pt; a save the disk refuses stops in one line


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_runs(demo_dir, tmp_path_factory):
    """8 steps straight, and a run stopped at step 4 that saved every 2 (ckpt.pt: step 4, ckpt.prev.pt: 2)."""
    root = tmp_path_factory.mktemp("runs")
    common = FAST + ["--data_dir", demo_dir, "--max_steps", "8", "--drop_path", "0.1"]
    train.main(common + ["--out_dir", str(root / "straight"), "--save_every", "100"])
    train.main(common + ["--out_dir", str(root / "stopped"), "--save_every", "2", "--stop_at", "4"])
    return root, common + ["--save_every", "2"]


@pytest.mark.parametrize("kind, says", [("truncated", "is cut short"), ("empty", "is empty (0 bytes)"),
                                        ("garbage", "is not a PyTorch checkpoint"), ("missing", "does not exist")])
def test_a_spoilt_ckpt_resumes_from_the_previous_one_bit_exact(two_runs, tmp_path, capsys, kind, says):
    """ckpt.pt cut short, empty, garbage, or gone (a crash between the two renames of a save): the run says
    so in one line, continues from ckpt.prev.pt, and ends where the uninterrupted run ends, bit for bit."""
    root, common = two_runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    if kind == "missing":
        (out / "ckpt.pt").unlink()
    else:
        spoil(out / "ckpt.pt", kind)
    capsys.readouterr()
    train.main(common + ["--out_dir", str(out), "--stop_at", "4"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {out}/ckpt.pt {says}"), warnings
    assert warnings[0].endswith(f"; resuming from {out}/ckpt.prev.pt (step 2)")
    # the spoilt file was replaced, not kept as the previous one
    assert load(out / "ckpt.pt")["step"] == 4 and load(out / "ckpt.prev.pt")["step"] == 2
    train.main(common + ["--out_dir", str(out)])
    a, b = load(root / "straight" / "ckpt.pt"), load(out / "ckpt.pt")
    assert a["step"] == b["step"] == 8 and load(out / "ckpt.prev.pt")["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("previous", ["garbage", "missing"])
def test_no_checkpoint_that_reads_stops_in_one_line_naming_the_files(two_runs, tmp_path, previous):
    root, common = two_runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    spoil(out / "ckpt.pt", "truncated")
    if previous == "missing":
        (out / "ckpt.prev.pt").unlink()
    else:
        spoil(out / "ckpt.prev.pt", previous)
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f.startswith("ckpt")}
    r = subprocess.run([sys.executable, "train.py"] + common + ["--out_dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    error = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and error[0].startswith("error: no checkpoint to resume from: "), r.stderr
    assert f"{out}/ckpt.pt is cut short" in error[0] and f"{out}/ckpt.prev.pt " in error[0]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f.startswith("ckpt")} == before  # nothing touched


class FullDisk(io.FileIO):
    """A file on a disk with ROOM bytes left: writes past it fail as the kernel's would."""
    ROOM = 1_000_000

    def write(self, b):
        if self.tell() + memoryview(b).nbytes > self.ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def refusing_open(fault):
    """open() for runtime.py, where the checkpoint's temporary file meets `fault`."""
    def fake(path, mode="r", *args, **kwargs):
        if ".tmp-" not in str(path):
            return open(path, mode, *args, **kwargs)
        if fault == "ENOSPC":
            return FullDisk(path, "wb")
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)  # as for anyone but root
    return fake


@pytest.fixture
def mount(tmp_path):
    """mount(*args, where): a real mount (tmpfs, bind), where this machine allows it (root, not every
    container); unmounted after the test."""
    mounted = []

    def run(*args, where):
        r = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")
        if not any(a.startswith("remount") for a in args):  # a remount changes a mount, makes none
            mounted.append(where)

    yield run
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)])


@pytest.mark.parametrize("fault, says", [
    ("ENOSPC", "No space left on device"), ("EACCES", "Permission denied"), ("vanished", "the folder is gone"),
    ("tmpfs full", "No space left on device"), ("read-only", "Read-only file system"),
])
def test_a_save_the_disk_refuses_stops_in_one_line_and_keeps_the_last(demo_dir, tmp_path, monkeypatch, mount, fault,
                                                                       says):
    """A full disk, no permission, the folder removed, injected; a real full tmpfs and a real read-only
    mount where mounting works: one line with the folder, the step, the size needed and what is intact; the
    temporary file removed and the last checkpoint byte-identical."""
    out = tmp_path / "disk" / "run"
    out.mkdir(parents=True)
    if fault == "tmpfs full":  # room for one demo checkpoint, not two
        mount("-t", "tmpfs", "-o", "size=12m", "tmpfs", where=out.parent)
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "4", "--save_every", "1"]
    train.main(common + ["--stop_at", "1"])
    before = (out / "ckpt.pt").read_bytes()
    if fault in ("ENOSPC", "EACCES"):
        monkeypatch.setattr(runtime, "open", refusing_open(fault), raising=False)
    elif fault in ("vanished", "read-only"):
        save = runtime.CheckpointFiles.save

        def refused_save(self, state):  # the folder goes, or turns read-only, just before the save
            if fault == "vanished":
                shutil.rmtree(out)
            else:  # over the folder, after the run opened log.jsonl (a mount with files open to write stays)
                mount("--bind", str(out), where=out)
                mount("-o", "remount,bind,ro", where=out)
            save(self, state)
        monkeypatch.setattr(runtime.CheckpointFiles, "save", refused_save)
    with pytest.raises(SystemExit) as e:
        train.main(common)
    msg = str(e.value)
    assert msg.startswith(f"error: cannot save the checkpoint of step 2 in {out}: {says}") and "\n" not in msg, msg
    assert " MB" in msg and "[enforce fail" not in msg
    if fault == "vanished":
        assert msg.endswith("no earlier checkpoint of this run is on disk") and not out.exists()
        return
    assert msg.endswith(f"intact: {out}/ckpt.pt (step 1)")
    assert (out / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "listings", "log.jsonl"]  # no temporary file left


def test_short_of_space_for_two_the_run_keeps_one_and_goes_on(demo_dir, tmp_path, mount, capsys):
    """A real tmpfs with room for two demo checkpoints, not three: each save removes ckpt.prev.pt first,
    says so, and the run finishes."""
    out = tmp_path / "disk"
    out.mkdir()
    mount("-t", "tmpfs", "-o", "size=20m", "tmpfs", where=out)
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out / "run"), "--max_steps", "4", "--save_every", "1"])
    said = capsys.readouterr().out.replace("\r", "\n")
    assert said.count(f"low on disk space: removed {out}/run/ckpt.prev.pt") == 2  # at steps 3 and 4
    assert load(out / "run" / "ckpt.pt")["step"] == 4 and load(out / "run" / "ckpt.prev.pt")["step"] == 3


RANK0_CANNOT_SAVE = """
import os, resource, signal, sys
sys.path.insert(0, {root!r})
import train

if os.environ["RANK"] == "0":  # files past 1 MB fail with EFBIG, as the kernel enforces it: the checkpoint does
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))
train.main(sys.argv[1:])
"""


def test_torchrun_rank0_cannot_save_and_every_rank_exits(demo_dir, tmp_path):
    """2 processes: rank 0's save fails (a real write error); rank 1 learns it from rank 0 instead of waiting
    at a barrier, and both stop with one line each and a non-zero exit."""
    script = tmp_path / "launch.py"
    script.write_text(RANK0_CANNOT_SAVE.format(root=ROOT))
    out = tmp_path / "run"
    returncode, text = torchrun_to_the_end(script, FAST + ["--data_dir", demo_dir, "--out_dir", str(out),
                                                           "--max_steps", "6", "--save_every", "2", "--workers", "0"])
    assert returncode != 0
    errors = sorted(line for line in text.replace("\r", "\n").splitlines() if line.startswith("error: "))
    assert len(errors) == 2, text[-4000:]
    assert errors[0].startswith(f"error: cannot save the checkpoint of step 2 in {out}: File too large (it needs ")
    assert errors[0].endswith("no earlier checkpoint of this run is on disk")
    assert errors[1] == "error: rank 1 stops: rank 0 could not save the checkpoint of step 2"
    assert not [f for f in os.listdir(out) if f.startswith("ckpt")]  # no temporary file left
    assert logged_steps(str(out)) == [1, 2]  # no rank went on past the save that failed


# ---- loader workers that die or stick: a restart and the one sample, never the run


def loader_workers(pid):
    """The DataLoader workers of process `pid`: the children of its fork server, from /proc."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:  # gone meanwhile
            continue
    servers = [c for c in children.get(pid, []) if b"forkserver" in open(f"/proc/{c}/cmdline", "rb").read()]
    return [w for s in servers for w in children.get(s, [])]


def said(text, what):
    return [line for line in text.replace("\r", "\n").splitlines() if what in line]


def test_a_loader_worker_killed_costs_a_restart_not_the_run(demo_dir, tmp_path):
    """SIGKILL, as the kernel's OOM killer sends it, to one worker of a real run: named once, and the run
    ends at max_steps with its checkpoint, every step logged once."""
    out = str(tmp_path / "run")
    p = run_train(FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "60", "--workers", "2"])
    wait_for(lambda: len(logged_steps(out)) >= 3, proc=p)
    worker = loader_workers(p.pid)[0]
    os.kill(worker, signal.SIGKILL)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text[-3000:]
    lines = said(text, "] loader worker ")
    assert len(lines) == 1 and f"(pid {worker}) killed by SIGKILL" in lines[0], lines
    assert lines[0].startswith("[rank 0] loader worker ") and "; the loader starts again at micro-batch " in lines[0]
    assert logged_steps(out) == list(range(1, 61)) and load(os.path.join(out, "ckpt.pt"))["step"] == 60


def test_a_stopped_worker_costs_its_sample_which_stays_quarantined(tmp_path):
    """A worker stopped (SIGSTOP) while it reads a file: a read that never returns. It is ended, the file named
    and counted as failed, and written to quarantine.jsonl; the run goes on, and after a resume the file is
    not read again (read, it would stick: nobody writes to it now). The weights are those of a run that
    had the file quarantined from the start, bit for bit; eval.py counts the file as failed, unread."""
    fifo = image_set_with_a_stall(tmp_path / "data" / "mine")
    common = FAST + ["--datasets", "mine", "--data_dir", str(tmp_path / "data"), "--model", "demo", "--img_size", "32",
                     "--dataset_batch_size", "mine=4", "--max_steps", "12", "--workers", "2", "--drop_path", "0.1",
                     "--sample_time_limit", "2"]
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "quarantine.jsonl").write_text(json.dumps({"dataset": "mine", "path": fifo, "why": "a test"}) + "\n")
    text = train_text(common + ["--out_dir", str(ref)])
    assert "quarantine: 1 files that stopped a loader worker are replaced unread" in text and not said(text, "] loader worker ")

    out = tmp_path / "run"
    p = run_train(common + ["--out_dir", str(out), "--stop_at", "6"])  # the stall is met in the first epoch, steps 0-3
    pid = signal_the_reader(fifo, signal.SIGSTOP)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text[-3000:]
    lines = said(text, "] loader worker ")
    assert len(lines) == 1 and f"(pid {pid}) stuck for " in lines[0] and "stopped (T); --sample_time_limit 2" in lines[0]
    assert f", reading {fifo}: quarantined" in lines[0]
    assert said(text, f"unreadable sample replaced (mine): {fifo}")  # counted as failed
    assert [json.loads(line)["path"] for line in open(out / "quarantine.jsonl")] == [fifo]

    text = train_text(common + ["--out_dir", str(out)])
    assert "quarantine: 1 files" in text and not said(text, "] loader worker ")
    a, b = load(ref / "ckpt.pt"), load(out / "ckpt.pt")
    assert a["step"] == b["step"] == 12 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["failed"] == b["failed"] and b["failed"]["mine"] >= 2  # the stall, in two epochs or more

    r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "ckpt.pt"), "--split", "train", "--workers", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(out / "eval.json"))["mine"]
    assert results["clips"] == 13 and results["failed"] == 1


def train_text(args):
    r = subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_torchrun_one_ranks_worker_killed_both_ranks_finish_and_skip_its_sample(tmp_path):
    """2 processes: the worker that reads the stall is killed. That rank restarts its loader, both finish, and
    the other rank, which meets the stall later in the run, skips it unread: the ranks shared the quarantine."""
    fifo = image_set_with_a_stall(tmp_path / "data" / "mine", n=40)
    steps, world, seed = 24, 2, 1
    meets = [(step, r) for step in range(steps) for r in range(world)
             for _, index, _ in data.MultiDatasetBatchSampler([41], [2], rank=r, world=world, seed=seed).batch(step)
             if index == 40]  # the stall is listed last
    first = meets[0]  # then no rank reads it until well past the batches prefetched, and the other rank does
    assert all(step > first[0] + 5 for step, _ in meets[1:]) and any(r != first[1] for _, r in meets), meets
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "train.py"] + FAST + [
        "--datasets", "mine", "--data_dir", str(tmp_path / "data"), "--out_dir", str(out), "--model", "demo",
        "--img_size", "32", "--dataset_batch_size", "mine=4", "--max_steps", str(steps), "--workers", "1",
        "--sample_time_limit", "60", "--seed", str(seed)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        signal_the_reader(fifo, signal.SIGKILL)
        text = p.communicate(timeout=400)[0]
    except (subprocess.TimeoutExpired, OSError):
        os.killpg(p.pid, signal.SIGKILL)  # the agent and every worker: nothing may outlive the test
        raise AssertionError("no exit:\n" + p.communicate()[0][-4000:]) from None
    assert p.returncode == 0, text[-4000:]
    lines = said(text, "] loader worker ")
    assert len(lines) == 1 and f"[rank {first[1]}] loader worker 0 " in lines[0] and "killed by SIGKILL" in lines[0], lines
    restart = int(lines[0].split("the loader starts again at micro-batch ")[1])
    assert first[0] - 4 <= restart <= first[0]  # where the loop stood: the batches made ahead die with the worker
    assert f", reading {fifo}: quarantined" in lines[0]
    assert [json.loads(line)["path"] for line in open(out / "quarantine.jsonl")] == [fifo]
    assert logged_steps(str(out))[-1] == steps and load(out / "ckpt.pt")["step"] == steps


def test_workers_that_keep_dying_end_the_run_in_one_line_after_a_checkpoint(demo_dir, tmp_path):
    """Not a bad file but the machine: each new worker killed at once. The fourth restart within minutes ends
    the run, the step finished in this process, with a checkpoint and one line naming what happened."""
    out = str(tmp_path / "run")
    p = run_train(FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "100000", "--workers", "1",
                          "--save_every", "100000"])
    wait_for(lambda: len(logged_steps(out)) >= 2, proc=p)
    killed = set()
    while p.poll() is None and len(killed) < 8:
        for worker in set(loader_workers(p.pid)) - killed:
            os.kill(worker, signal.SIGKILL)
            killed.add(worker)
        time.sleep(0.05)
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 1, text[-3000:]
    assert len(said(text, "] loader worker ")) == 4
    errors = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: the loader's workers failed 4 times within 10 minutes, "
                                                     "the last: loader worker 0 (pid "), errors
    assert "Try fewer --workers. Saved " in errors[0] and "Traceback" not in text
    step = int(errors[0].split(" at step ")[1].split(":")[0])
    assert load(os.path.join(out, "ckpt.pt"))["step"] == step == logged_steps(out)[-1]


# ---- the rest of a full disk: log.jsonl and eval.json


def refusing(name, fault, room=0):
    """open() for a module, where the file `name` meets `fault`: a disk with `room` bytes left, or no permission."""
    def fake(path, mode="r", *args, **kwargs):
        if os.path.basename(str(path)) != name:
            return open(path, mode, *args, **kwargs)
        if fault == "EACCES":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        disk = FullDisk(path, mode.replace("t", ""))
        disk.ROOM = room
        return io.TextIOWrapper(io.BufferedWriter(disk))
    return fake


@pytest.mark.parametrize("fault, says", [("ENOSPC", "No space left on device"), ("EACCES", "Permission denied")])
def test_log_jsonl_refused_stops_in_one_line_after_a_checkpoint(demo_dir, tmp_path, monkeypatch, fault, says):
    """The step after the write that failed is the last: a checkpoint, then one line (exit status 1)."""
    out = tmp_path / "run"
    monkeypatch.setattr(runtime, "open", refusing("log.jsonl", fault, room=2000), raising=False)  # a few records
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "40", "--save_every", "100"])
    written = logged_steps(str(out))
    msg = str(e.value)
    assert msg.startswith(f"error: cannot write {out}/log.jsonl: {says}. Saved {out}/ckpt.pt at step ") and "\n" not in msg
    step = int(msg.split(" at step ")[1].split(":")[0])
    # no room: the record of step len + 1 failed; no permission: the first, the run's start-up record
    assert step == (len(written) + 2 if fault == "ENOSPC" else 1) and load(out / "ckpt.pt")["step"] == step


def test_stop_at_right_after_a_refused_record_still_says_it(demo_dir, tmp_path, monkeypatch):
    """The record of step s refused, and --stop_at s: the run stops there for --stop_at, and still in its one
    line of error (exit 1), not with 'rerun without --stop_at'."""
    monkeypatch.setattr(runtime, "open", refusing("log.jsonl", "ENOSPC", room=2000), raising=False)
    common = FAST + ["--data_dir", demo_dir, "--max_steps", "40", "--save_every", "100"]
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--out_dir", str(tmp_path / "first")])
    refused = int(str(e.value).split(" at step ")[1].split(":")[0]) - 1  # the step whose record failed
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--out_dir", str(out), "--stop_at", str(refused)])
    assert str(e.value) == (f"error: cannot write {out}/log.jsonl: No space left on device. Saved {out}/ckpt.pt at "
                            f"step {refused}: the same command continues from it")
    assert load(out / "ckpt.pt")["step"] == refused


RANK0_CANNOT_LOG = """
import errno, os, sys
sys.path.insert(0, {root!r})
import runtime, train

def refuse(path, *args, **kwargs):  # rank 0's log.jsonl, refused as by a folder that turned read-only
    if os.path.basename(str(path)) == "log.jsonl":
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return open(path, *args, **kwargs)

if os.environ["RANK"] == "0":
    runtime.open = refuse
train.main(sys.argv[1:])
"""


def test_torchrun_log_jsonl_refused_stops_every_rank_after_a_checkpoint(demo_dir, tmp_path):
    """Rank 0 alone writes log.jsonl: the other rank learns of the failure on the next step's all-reduce, and
    both stop after the checkpoint, each with one line, instead of one going on alone into a collective."""
    script = tmp_path / "launch.py"
    script.write_text(RANK0_CANNOT_LOG.format(root=ROOT))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)] + FAST + [
        "--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "6", "--save_every", "100"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        text = p.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the agent and every worker: nothing may outlive the test
        raise AssertionError("a rank did not exit:\n" + p.communicate()[0][-4000:]) from None
    assert p.returncode != 0, text[-4000:]  # (torchrun's agent reports a failed rank with a traceback of its own)
    errors = sorted(line[line.index("error: "):] for line in text.replace("\r", "\n").splitlines() if "error: " in line)
    tail = f". Saved {out}/ckpt.pt at step 1: the same command continues from it"  # the start-up record failed
    assert errors == [f"error: cannot write {out}/log.jsonl: Read-only file system" + tail,
                      "error: rank 1 stops: another rank stopped the run" + tail], errors
    assert load(out / "ckpt.pt")["step"] == 1


@pytest.mark.parametrize("fault", ["ENOSPC", "read-only"])
def test_eval_json_refused_is_one_line_and_leaves_nothing(demo_dir, tmp_path, monkeypatch, mount, fault):
    """A full disk, injected; a real read-only folder where this machine can mount one (eval.py in a process
    of its own, whose memory-mapped listings end with it and leave the mount free to go)."""
    out = tmp_path / "run"
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "1"])
    before = sorted(os.listdir(out))
    if fault == "read-only":
        mount("--bind", str(out), where=out)
        mount("-o", "remount,bind,ro", where=out)
        r = subprocess.run([sys.executable, "eval.py", "--ckpt", str(out / "ckpt.pt"), "--workers", "0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 1 and "Traceback" not in r.stderr
        msg = r.stderr.strip()
    else:
        monkeypatch.setattr(evaluate, "open", refusing("eval.json.tmp", "ENOSPC", room=100), raising=False)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--ckpt", str(out / "ckpt.pt"), "--workers", "0"])
        msg = str(e.value)
    says = "No space left on device" if fault == "ENOSPC" else "Read-only file system"
    assert msg == f"error: cannot write {out}/eval.json: {says} (the results are printed above)"
    assert sorted(os.listdir(out)) == before  # no eval.json, whole or cut short, no temporary file


# ---- resuming: one checkpoint for every rank; a save that stopped between its renames is finished


CRASH_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, {root!r})
import train

replace = os.replace


def gone_between_the_renames(src, dst):  # a save renames ckpt.pt to ckpt.prev.pt, and the process dies
    replace(src, dst)
    if str(dst).endswith("ckpt.prev.pt"):
        os._exit(9)


os.replace = gone_between_the_renames
train.main(sys.argv[1:])
"""


def test_a_save_that_stopped_between_its_renames_is_finished_and_resumed_bit_exact(two_runs, tmp_path, capsys):
    """A run killed after its save at step 4 renamed ckpt.pt aside and before it renamed the whole new file
    into place: ckpt.prev.pt holds step 2, the temporary file step 4. The next run resumes from step 4 (the
    file renamed to ckpt.pt, with one line) and ends where the uninterrupted run ends, bit for bit."""
    root, common = two_runs
    out = tmp_path / "run"
    script = tmp_path / "launch.py"
    script.write_text(CRASH_BETWEEN_RENAMES.format(root=ROOT))
    threads = str(torch.get_num_threads())  # as the runs in this process: the same sums, to the bit
    r = subprocess.run([sys.executable, str(script)] + common + ["--out_dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": threads})
    assert r.returncode == 9, r.stdout[-2000:] + r.stderr[-2000:]
    tmp = [f for f in os.listdir(out) if f.startswith("ckpt.pt.tmp-")]
    assert len(tmp) == 1 and not (out / "ckpt.pt").exists()
    assert load(out / tmp[0])["step"] == 4 and load(out / "ckpt.prev.pt")["step"] == 2
    capsys.readouterr()
    train.main(common + ["--out_dir", str(out)])
    said = capsys.readouterr().out
    warnings = [line for line in said.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {out}/ckpt.pt does not exist; resuming from {out}/{tmp[0]} (step 4); a save "
                        f"left it whole but did not rename it: now {out}/ckpt.pt"]
    assert f"resuming from {out}/ckpt.pt (step 4)" in said
    a, b = load(root / "straight" / "ckpt.pt"), load(out / "ckpt.pt")
    assert a["step"] == b["step"] == 8 and load(out / "ckpt.prev.pt")["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def smallest_checkpoint(step):
    """What CheckpointFiles.read accepts as a checkpoint of train.py, at its smallest."""
    return {k: {} for k in runtime.RUN_KEYS} | {
        "step": step, "sampler": {"micro": step}, "config": {}, "model_config": {"width": 4, "depth": 1},
        "model": {"cls_token": torch.zeros(1, 1, 4), "blocks.0.norm2.weight": torch.ones(4)}, "failed": {}}


def test_resume_is_accepted_where_a_whole_temporary_file_is_the_only_checkpoint(tmp_path):
    """A run's first save killed after writing its temporary file and before renaming it: no ckpt.pt, no
    ckpt.prev.pt. load resumes from that file, so --resume accepts the folder; a temporary file cut short
    (the save itself killed) is no checkpoint, for load as for --resume."""
    out = tmp_path / "run"
    out.mkdir()
    tmp = out / "ckpt.pt.tmp-4242"
    torch.save(smallest_checkpoint(6), tmp)
    whole = tmp.read_bytes()
    assert train.get_args(["--out_dir", str(out), "--resume"]).resume
    ckpt, path = runtime.CheckpointFiles(str(out / "ckpt.pt")).load()
    assert ckpt["step"] == 6 and path == str(out / "ckpt.pt")
    (out / "ckpt.pt").unlink()
    tmp.write_bytes(whole[:len(whole) // 2])
    assert runtime.CheckpointFiles(str(out / "ckpt.pt")).load() == (None, None)
    with pytest.raises(SystemExit, match="--resume: no checkpoint in"):
        train.get_args(["--out_dir", str(out), "--resume"])


RANK1_READS_OTHERWISE = """
import errno, os, sys
sys.path.insert(0, {root!r})
import torch
import train

if os.environ["RANK"] == "1":  # ckpt.pt as another node may see it: a transient read error, or older bytes
    load = torch.load

    def read_here(f, *args, **kwargs):
        if str(f).endswith("ckpt.pt"):
            if os.environ["FAULT"] == "EIO":
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(f))
            f = str(f).replace("ckpt.pt", "ckpt.prev.pt")  # an attribute cache that has not seen the rename
        return load(f, *args, **kwargs)

    torch.load = read_here
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("fault, says", [("EIO", "cannot be read (Input/output error)"),
                                         ("stale", "holds step 2 here: is --out_dir one folder that every node "
                                                   "shares?")])
def test_torchrun_ranks_resume_from_rank0s_checkpoint_or_all_stop(two_runs, tmp_path, fault, says):
    """2 processes resuming a run whose ckpt.pt holds step 4 (ckpt.prev.pt: 2), where rank 1 cannot read ckpt.pt
    or reads older bytes under its name. Left to itself rank 1 would start from step 2 and rank 0 from step 4;
    rank 0 chooses, rank 1 reads that same file and step or says why not, and both stop with one line each."""
    root, common = two_runs
    out = tmp_path / "run"
    shutil.copytree(root / "stopped", out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f.startswith("ckpt")}
    script = tmp_path / "launch.py"
    script.write_text(RANK1_READS_OTHERWISE.format(root=ROOT))
    returncode, text = torchrun_to_the_end(script, [*common, "--out_dir", str(out), "--workers", "0"], FAULT=fault)
    assert returncode != 0
    errors = sorted(line for line in text.replace("\r", "\n").splitlines() if line.startswith("error: "))
    rank1 = f"rank 1 cannot resume from {out}/ckpt.pt (step 4), as rank 0 does: {out}/ckpt.pt {says}"
    assert errors == [f"error: rank 0 stops: {rank1}", f"error: {rank1}"], text[-4000:]
    assert logged_steps(str(out)) == [1, 2, 3, 4]  # no rank trained a step
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f.startswith("ckpt")} == before


@pytest.mark.parametrize("answer", [errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF])
def test_a_file_system_that_cannot_sync_a_folder_still_saves(tmp_path, monkeypatch, answer):
    """Some file systems cannot sync a folder, and say so in different ways; a save there is as durable as
    they allow. A real write error while syncing still fails the save."""
    fsync = os.fsync

    def folder_refuses(fd, error=answer):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(error, os.strerror(error))
        return fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", folder_refuses)
    files = runtime.CheckpointFiles(str(tmp_path / "ckpt.pt"))
    files.save({"step": 1, "w": torch.ones(3)})
    files.save({"step": 2, "w": torch.ones(3)})
    assert load(tmp_path / "ckpt.pt")["step"] == 2 and load(tmp_path / "ckpt.prev.pt")["step"] == 1
    monkeypatch.setattr(runtime.os, "fsync", lambda fd: folder_refuses(fd, errno.EIO))
    with pytest.raises(runtime.CheckpointError) as e:
        files.save({"step": 3, "w": torch.ones(3)})
    assert str(e.value) == (f"saved the checkpoint of step 3 as {tmp_path}/ckpt.pt, but cannot sync {tmp_path} "
                            f"(Input/output error): a crash of the machine may undo the save; {tmp_path}/ckpt.prev.pt "
                            "holds step 2")
    assert load(tmp_path / "ckpt.pt")["step"] == 3


def test_a_folder_that_cannot_be_synced_after_load_finished_a_save_says_so(tmp_path, monkeypatch):
    """load renames a whole temporary file a save left to ckpt.pt, then syncs the folder: where only the sync
    fails, its line says that the rename was done and the sync was not."""
    torch.save(smallest_checkpoint(6), tmp_path / "ckpt.pt.tmp-4242")
    fsync = os.fsync

    def folder_fails(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)

    monkeypatch.setattr(runtime.os, "fsync", folder_fails)
    with pytest.raises(runtime.CheckpointError) as e:
        runtime.CheckpointFiles(str(tmp_path / "ckpt.pt")).load()
    assert str(e.value) == (f"renamed {tmp_path}/ckpt.pt.tmp-4242, the whole checkpoint of step 6 that a save left, "
                            f"to {tmp_path}/ckpt.pt, but cannot sync its folder: Input/output error")
    assert load(tmp_path / "ckpt.pt")["step"] == 6


def test_a_file_system_that_will_not_say_its_free_space_still_fails_in_one_line(tmp_path, monkeypatch):
    """shutil.disk_usage fails (a stale NFS handle): the save fails, and its one line, which names the free
    space where it can, does not fail in turn (other ranks wait to hear from rank 0)."""
    def stale(folder):
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), folder)

    monkeypatch.setattr(runtime.shutil, "disk_usage", stale)
    files = runtime.CheckpointFiles(str(tmp_path / "ckpt.pt"))
    with pytest.raises(runtime.CheckpointError) as e:
        files.save({"step": 1, "w": torch.ones(3)})
    assert str(e.value) == (f"cannot save the checkpoint of step 1 in {tmp_path}: Stale file handle (it needs about "
                            "1.0 MB). No temporary file is left; no earlier checkpoint of this run is on disk")
