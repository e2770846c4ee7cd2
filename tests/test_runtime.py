"""runtime.py: the published peaks MFU is counted against, a real two-process torchrun start-up in which
rank 0 lists the datasets alone for longer than the process group's timeout, the run's log going to
TensorBoard and W&B too, and the checkpoint files' renames and folder sync."""

import argparse
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import runtime
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),   # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12),
    ("NVIDIA H100 PCIe", torch.float32, 378e12),        # fp32 matmuls run as TF32: half the bf16 rate
    ("NVIDIA H200", torch.float16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 156e12),
    ("NVIDIA L40S", torch.bfloat16, 362e12),
])
def test_published_peak_by_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert runtime.peak_flops(torch.device("cuda", 0), dtype) == peak


def test_cpu_peak_is_measured():
    assert 1e8 < runtime.peak_flops(torch.device("cpu"), torch.float32) < 1e14


LAUNCHER = """
import datetime, os, sys, time
import torch.distributed as dist
sys.path.insert(0, {root!r})
import layouts, runtime, train

# the default process group with a short timeout, as NCCL's 10 minutes are short for listing ImageNet-21K
init = dist.init_process_group
dist.init_process_group = lambda *a, **k: init(*a, **{{**k, "timeout": datetime.timedelta(seconds=4)}})
runtime.STARTUP_TIMEOUT = datetime.timedelta(seconds={startup})
parse = layouts.parse

def slow_parse(*a, **k):  # a slow file system: listing takes longer than the default group's timeout
    print("listed by rank", os.environ["RANK"], flush=True)
    time.sleep(8)
    return parse(*a, **k)

layouts.parse = slow_parse
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("startup, ok", [(600, True), (4, False)])
def test_rank0_lists_alone_and_the_others_wait_past_the_group_timeout(demo_dir, tmp_path, startup, ok):
    """Rank 0 lists each dataset once (8 s a listing here, against a 4 s timeout of the default group);
    rank 1 waits on the start-up group and reads rank 0's listings. With the start-up group's timeout as
    short as the default group's, the same run fails: what a plain barrier would do."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(root=ROOT, startup=startup))
    args = ["--recipe", "demo", "--datasets", "demo_ssv2", "--data_dir", demo_dir, "--out_dir", str(tmp_path / "out"),
            "--max_steps", "2", "--batch_size", "4", "--workers", "0", "--final_eval", "none", "--eval_every", "0"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
                       + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert (r.returncode == 0) == ok, out[-3000:]
    assert "listed by rank 0" in out and "listed by rank 1" not in out
    if ok:
        assert out.count("listed by rank 0") == 2  # train and val, once each
        assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 2


FAST = ["--recipe", "demo", "--batch_size", "4", "--warmup_steps", "2", "--log_every", "1", "--eval_every", "3",
        "--final_eval", "multiview", "--workers", "0", "--max_steps", "6"]


def logged(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def test_tensorboard_holds_the_logged_numbers_and_a_resumed_run_continues_them(demo_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--tensorboard"]
    train.main(args + ["--stop_at", "4"])
    train.main(args)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expect = {}  # (tag, step) -> value, from log.jsonl
    for record in logged(tmp_path):
        expect.update({(tag, record["step"]): v for tag, v in runtime.scalars(record).items()})
    tags = events.Tags()["scalars"]
    assert {"lr", "clips_per_s", "data_wait", "mfu", "loss/demo_ssv2", "val/demo_ssv2/top1",
            "test/demo_kinetics/top1"} <= set(tags)
    got = {(tag, e.step): e.value for tag in tags for e in events.Scalars(tag)}
    assert got.keys() == expect.keys()  # each step once, the resumed part continuing the curves
    assert all(abs(got[k] - expect[k]) <= 1e-6 * max(1.0, abs(expect[k])) for k in got)  # stored as float32
    assert sorted(step for tag, step in got if tag == "lr") == [1, 2, 3, 4, 5, 6]


class FakeWandb:
    """Stands in for the wandb package: records what train.py gives it."""

    def __init__(self):
        self.inits, self.logs = [], []

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, values, step):
        self.logs.append((step, values))

    def finish(self):
        pass


def test_wandb_gets_the_logged_numbers_in_one_run_across_a_resume(demo_dir, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    args = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--wandb", "cover-demo"]
    train.main(args + ["--stop_at", "3"])
    train.main(args)
    assert [i["project"] for i in fake.inits] == ["cover-demo"] * 2 and fake.inits[0]["id"] == fake.inits[1]["id"]
    assert fake.inits[1]["resume"] == "allow" and fake.inits[0]["config"]["wandb"] == "cover-demo"
    assert fake.logs == [(r["step"], runtime.scalars(r)) for r in logged(tmp_path)]


@pytest.mark.parametrize("flag", [["--tensorboard"], ["--wandb", "p"]])
def test_a_missing_extra_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, flag):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit) as e:
        train.main(flag + ["--out_dir", str(tmp_path)])
    package = flag[0][2:]
    assert f"pip install {package}" in str(e.value) and "\n" not in str(e.value)


def test_a_save_keeps_the_one_before_and_syncs_the_folder_after_its_renames(tmp_path, monkeypatch):
    """Each save: the temporary file flushed, ckpt.pt renamed to ckpt.prev.pt, the new one to ckpt.pt, then
    the folder synced so the renames last; a temporary file of a killed save is removed first."""
    path, fsync, synced = tmp_path / "ckpt.pt", os.fsync, []

    def spy(fd):  # what the folder holds when it is synced
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append((sorted(os.listdir(tmp_path)), torch.load(path, weights_only=True)["step"]))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    (tmp_path / "ckpt.pt.tmp-1").write_bytes(b"\0" * 1000)  # left by a save that was killed
    files = runtime.CheckpointFiles(str(path))
    for step in (1, 2, 3):
        files.save({"step": step, "w": torch.full((10,), float(step))})
    assert synced == [(["ckpt.pt"], 1), (["ckpt.prev.pt", "ckpt.pt"], 2), (["ckpt.prev.pt", "ckpt.pt"], 3)]
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["w"][0] == 2
    # a ckpt.pt this process has neither read nor written is replaced, never kept as the previous one
    path.write_bytes(b"spoilt")
    files = runtime.CheckpointFiles(str(path))
    files.save({"step": 4, "w": torch.zeros(10)})
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["step"] == 2


def test_step_values_are_read_one_step_late_unless_all_are_asked_for(monkeypatch):
    """One process, no group: the values come back as sent, the newest one held back until asked for; the stop
    flag stays once seen; the clock is rank 0's, from the resumed run's seconds on."""
    now = [7.0]
    monkeypatch.setattr(runtime, "clock", lambda: now[0])
    late = runtime.StepValues(runtime.Runtime(0, 1, torch.device("cpu")), seconds=100.0)
    now[0] = 9.5
    late.send(0, "a", torch.tensor(2.5), False)
    assert late.read() == [] and late.clock == 100.0
    now[0] = 12.0
    late.send(1, "b", torch.tensor(float("nan")), True, kept=False)
    assert late.read() == [(0, "a", 2.5, True)] and not late.stop and late.clock == 102.5
    got = late.read(everything=True)
    assert [(s, n, k) for s, n, _, k in got] == [(1, "b", False)] and got[0][2] != got[0][2] and late.stop  # NaN
    assert late.clock == 105.0
    late.send(2, "a", torch.tensor(1.0), False)
    assert late.read(everything=True) == [(2, "a", 1.0, True)] and late.stop and late.read(everything=True) == []


def test_a_cadence_in_minutes_is_due_when_the_clock_passes_a_multiple():
    assert [s for s in range(1, 10) if runtime.due(3, s, 0.0, 0.0)] == [3, 6, 9]
    clocks = [50.0, 55, 59.9, 60, 61, 119, 125, 250]  # a run resumed at 50 s, its clock at each step's decision
    assert [now for since, now in zip(clocks, clocks[1:]) if runtime.due("1min", 0, since, now)] == [60, 125, 250]
    assert runtime.due("15.0000001min", 0, 899.9, 900.000006) and not runtime.due("15.0000001min", 0, 899.9, 900.0)
    assert not any(runtime.due(0, s, 0.0, 1e9) for s in range(1, 10))  # --eval_every 0: only at the end


@pytest.mark.parametrize("pinned, free_mib, processes, says", [
    (False, 64, 1, "--shm-size=2g"),     # a CPU run in a container's default shm
    (True, 64, 1, "--shm-size=1g"),      # a GPU
    (True, 64, 8, "--shm-size=5g"),      # eight GPUs on the node
    (True, 2 ** 12, 8, None),            # 4 GiB: room
    (False, 2 ** 12, 8, "--shm-size=13g"),
])
def test_shm_too_small_for_the_batches_kept_there_is_one_line_with_the_fix(tmp_path, monkeypatch, pinned, free_mib,
                                                                           processes, says):
    """The cover recipe's 8 workers a process, 8 training clips of 3x8x224x224 bytes (9.2 MiB) a batch, test batches
    of 3 views (27.6 MiB). Without pinned memory (CPU) the batches stay in shm until used: 8 x 4 prefetched and the
    one in use, and beside them while testing 8 x 2 and one: 33 + 17 x 3 = 84 training batches' worth, 772 MiB a
    process. With pinned memory (GPU) a thread copies each out as it comes: one a worker of each, 8 + 8 x 3 = 32,
    294 MiB a process, 2.3 GiB for 8."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: usage._replace(free=free_mib * 2**20)
                        if path == str(tmp_path) else usage)
    args = train.get_args(["--datasets", "k400,ssv2,in21k"])
    batch = 8 * 3 * 8 * 224 * 224
    line = runtime.shm_warning(args, batch, 3 * batch, pinned, shm=str(tmp_path))
    if says is None:
        assert line is None
    else:
        need = processes * (32 if pinned else 84) * batch / 2**20
        assert line.startswith(f"warning: {tmp_path} has {free_mib} MiB free") and "\n" not in line
        assert f"about {need:.0f} MiB" in line and "--ipc=host" in line and says in line, line
    assert runtime.shm_warning(argparse.Namespace(workers=0), batch, batch, pinned, shm=str(tmp_path)) is None
