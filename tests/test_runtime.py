"""runtime.py: the published peaks MFU is counted against, and a real two-process torchrun start-up in
which rank 0 lists the datasets alone for longer than the process group's timeout."""

import os
import subprocess
import sys

import pytest
import torch

import runtime

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
