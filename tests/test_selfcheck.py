"""tools/selfcheck.py on the CPU: the quick run passes with every row (train.py under torchrun over gloo among
them), a wrong kernel makes it fail, and its counting (launches, the GPU's busy time, the README row) by hand."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/ is a folder of scripts, not a package

import model as M  # noqa: E402
import profile_train  # noqa: E402
import selfcheck  # noqa: E402

RUNS = ("torchrun eager", "torchrun resume", "torchrun compile", "torchrun grad_accum 2")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The script's stdout, exit code and JSON table, run as a user runs it."""
    table = tmp_path_factory.mktemp("selfcheck") / "table.json"
    command = [sys.executable, os.path.join(ROOT, "tools", "selfcheck.py"), "--quick", "--device", "cpu",
               "--json", str(table)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    return proc.stdout.splitlines(), json.loads(table.read_text())


def status_of(lines, check):
    """The status column of the one table line whose check column is `check`."""
    found = [line.split("|") for line in lines if line.split("|")[0].strip() == check]
    assert len(found) == 1, f"no single row {check!r} in:\n" + "\n".join(lines)
    return found[0][-1].strip()


def test_quick_run_checks_every_shape_backend_step_and_run(quick_run):
    lines, table = quick_run
    checks = [r["check"] for r in table["rows"]]
    for shape in ("spatial", "temporal"):
        rows = [c for c in checks if c.startswith(f"sdpa {shape} (")]
        assert [c.split()[-1] for c in rows] == ["flash", "efficient", "cudnn", "math", "default"]
        for check in rows:
            assert status_of(lines, check) in ("ok", "-")  # '-': not available on the CPU
        assert status_of(lines, rows[0]) == "ok"  # the CPU has a flash kernel
    for kind in ("video", "image"):
        assert status_of(lines, f"bf16 {kind} step") == "ok"
        for variant in selfcheck.VARIANTS:
            assert status_of(lines, f"grads {kind} {variant}") == "ok"
        assert int(next(r["result"] for r in table["rows"] if r["check"] == f"launches {kind} step")) > 1000
    for run in RUNS:  # train.py in a gloo group with a DDP wrapper for one process; compiled; resumed
        assert status_of(lines, run) == "ok"
    assert "gloo group" in next(line for line in lines if line.startswith("torchrun eager"))
    assert "2 graphs, 1 recompile(s), 0 graph breaks; validated mid-run: True" in \
        next(line for line in lines if line.startswith("torchrun compile"))
    for run in ("eager", "compile"):
        assert status_of(lines, f"speed {run}") == "-" and table["speed"][run]["step_ms"] > 0
    assert "no verdict on the CPU" in next(line for line in lines if line.startswith("compile as the cover"))
    assert "skipped on CPU" in next(line for line in lines if line.startswith("largest image batch"))
    assert lines[-1].startswith("self-check passed") and table["passed"]


def test_nan_gradient_from_a_backend_fails_and_names_the_rows(monkeypatch, capsys, tmp_path):
    real_attend = selfcheck.attend

    def flash_with_nan_dx(att, x, grad_out, backend=None, dtype=torch.float32):  # as pytorch#139298 for cuDNN
        out, dx, dw = real_attend(att, x, grad_out, backend, dtype)
        if backend == selfcheck.SDPBackend.FLASH_ATTENTION:
            dx[0, 0, 0] = math.nan
        return [out, dx, dw]

    monkeypatch.setattr(selfcheck, "attend", flash_with_nan_dx)
    for section in ("check_bf16", "check_grads", "check_launches", "check_torchrun"):  # the run above has them
        monkeypatch.setattr(selfcheck, section, lambda s: [])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    assert selfcheck.main(["--device", "cpu", "--work", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [line.split("|")[0].strip() for line in lines if line.endswith("| FAIL")]
    assert [(check.split()[1], check.split()[-1]) for check in failed] == [("spatial", "flash"),
                                                                         ("temporal", "flash")]
    default = next(line for line in lines if line.startswith("sdpa spatial") and " default " in line)
    assert default.endswith("| ok")  # PyTorch's own choice was not corrupted
    assert lines[-1] == "self-check FAILED: " + "; ".join(failed)


def doubled_gradient(y):
    """y's value, with every gradient through it twice as large (as a gradient summed twice would be)."""
    return 2 * y - y.detach()


@pytest.fixture
def setup(tmp_path):
    return selfcheck.Setup(torch.device("cpu"), M.make_config("demo", drop_path=0.1), 2, "aot_eager", True,
                           str(tmp_path))


def test_a_bf16_step_whose_gradients_are_twice_too_large_fails_its_row(setup, monkeypatch):
    """Under autocast the trunk's gradients double (its output is the same): the loss and every gradient's
    direction are those of fp32, so the loss and cosine alone pass it; the norm ratio before clipping fails it."""
    plain = M.TimeSformer.forward_features

    def sabotaged(self, x):  # in bf16 only
        return doubled_gradient(plain(self, x)) if torch.is_autocast_enabled("cpu") else plain(self, x)

    monkeypatch.setattr(M.TimeSformer, "forward_features", sabotaged)
    rows = selfcheck.check_bf16(setup)
    assert [r["check"] for r in rows] == ["bf16 video step", "bf16 image step"] and not any(r["ok"] for r in rows)
    for r in rows:
        cosine, ratio = map(float, re.search(r"grad cosine >= ([\d.]+) .*norm ratio ([\d.]+)", r["detail"]).groups())
        assert cosine > selfcheck.BF16_COSINE and 1.9 < ratio < 2.1, r  # the direction holds, the size does not
    monkeypatch.undo()
    assert all(r["ok"] for r in selfcheck.check_bf16(setup))


def test_a_compiled_step_whose_gradients_are_twice_too_large_fails_its_row(setup, monkeypatch):
    """The gradients compared are the backward's, before clipping scales a doubled gradient back to norm 1."""
    monkeypatch.setattr(M.TimeSformer, "compile_trunk", lambda self, **kw: setattr(
        self, "compiled_trunk", lambda x: doubled_gradient(self.forward_features(x))))
    rows = {r["check"]: r for r in selfcheck.check_grads(setup)}
    assert [ok for r in rows.values() for ok in [r["ok"]]] == [True, True, False] * 2, rows
    assert "grad Δ 1.0e+00" in rows["grads video compile"]["detail"]


def test_gradient_error_and_cosine_report_the_worst_parameter():
    reference = {"a": torch.ones(4), "b": torch.ones(2)}
    error, name = selfcheck.gradient_error({"a": torch.full((4,), 1.5), "b": torch.ones(2)}, reference)
    assert (error, name) == (0.5, "a")
    with_nan = {"a": torch.ones(4), "b": torch.tensor([1.0, math.nan])}
    error, name = selfcheck.gradient_error(with_nan, reference)
    assert math.isnan(error) and name == "b"
    assert selfcheck.gradient_error({"a": torch.ones(4)}, reference) == (math.inf, "b got no gradient")
    turned = {"a": torch.tensor([1.0, 1.0, 1.0, -1.0]), "b": torch.tensor([2.0, 2.0])}
    assert selfcheck.lowest_cosine(turned, reference) == (0.5, "a")  # (1 + 1 + 1 - 1) / (2 x 2)
    assert selfcheck.lowest_cosine({"a": torch.ones(4), "b": torch.zeros(2)}, reference) == (0.0, "b")


def test_cpu_launch_count_takes_each_kernel_once_and_no_view_allocation_or_decomposition():
    a, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = F.linear(a, w, b)              # decomposed: t (a view) and addmm, 1 kernel
        y = y.view(-1).reshape(3, 4) + 1   # view, reshape as a view: 0; add: 1
        z = y.to(torch.bfloat16)           # to -> _to_copy: 1 (its copy_ inside not again)
        parts = torch.cat([y, y]).split(2)  # cat: 1; split: views
        torch.empty(5)                     # an allocation: 0
        parts[0].sum().item()              # sum: 1; item: a read to the host, 0
    assert selfcheck.count_cpu_launches(prof.events()) == 5, [e.name for e in prof.events()]
    assert z.dtype == torch.bfloat16


def test_gpu_busy_time_is_the_union_of_kernels_within_the_steps():
    kernels = [(0, 2), (1, 3), (5, 6), (9, 12)]
    assert profile_train.busy_time(kernels, 0, 10) == 2 + 1 + 1 + 1  # (0, 3), (5, 6), (9, 10)
    assert profile_train.busy_time(kernels, 1.5, 5.5) == 1.5 + 0.5


def test_a_profiled_window_cut_short_by_the_runs_end_counts_only_whole_steps():
    """profile_train's Recorder, stepped as train.py's optimizer steps it. A run that ends inside the window (skip 1,
    a warm-up step, 5 to profile; 3 steps taken) leaves the profiler a last span from its third step to its end
    (the final save, test and teardown): no step, so one whole step is left. A window the run completes counts
    its steps; one the run ends before, none."""
    for skip, steps, taken, whole in [(1, 5, 3, 1), (8, 10, 20, 10), (0, 1, 2, 1), (1, 3, 2, 0), (5, 3, 2, 0)]:
        recorder = profile_train.Recorder(skip, steps, cuda=False)
        recorder.profiler.start()
        for _ in range(taken):
            torch.randn(64, 64) @ torch.randn(64, 64)
            recorder.after_step(None, (), {})
        recorder.profiler.stop()
        assert recorder.result.get("steps", 0) == whole, (skip, steps, taken, recorder.result)


def test_readme_row_from_a_runs_json():
    table = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "passed": True, "seconds": 420,
             "speed": {"eager": {"step_ms": 81.2, "mfu": 0.312, "gpu_idle": 0.34, "peak_memory_gib": 20.6},
                       "compile": {"step_ms": 55.0, "mfu": 0.455, "gpu_idle": 0.04, "peak_memory_gib": 14.1}}}
    assert selfcheck.readme_row(table) == ("| NVIDIA H100 80GB HBM3 | 2.13.0 | 81 ms | 55 ms | 31% / 46% | 34% / 4% "
                                           "| 21 GiB | passed (7 min) |")
    assert selfcheck.README_HEADER.splitlines()[0].count("|") == selfcheck.readme_row(table).count("|")
