"""Faults injected for real: SIGTERM (preemption), SIGKILL during a checkpoint write, a rank killed under
torchrun --max-restarts, a diverging run, and corrupt files in a training set."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import train

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
path = sys.argv[1]
runtime.save_checkpoint(path, {"step": 1, "w": torch.ones(10)})
print("first", flush=True)
runtime.save_checkpoint(path, {"step": 2, "w": torch.randn(100_000_000)})  # 400 MB: takes a while to write
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
    with pytest.raises(Exception, match="no readable sample"):
        train.main(FAST + ["--datasets", "broken", "--data_dir", str(tmp_path / "data"), "--out_dir",
                           str(tmp_path / "out"), "--model", "demo", "--img_size", "32", "--max_steps", "2"])
