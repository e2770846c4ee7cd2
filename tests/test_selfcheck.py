"""tools/selfcheck.py on the CPU: the quick run passes with every row, and a wrong kernel makes it fail."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/ is a folder of scripts, not a package

import selfcheck  # noqa: E402

VARIANTS = ("plain", "compile", "ckpt", "compile+ckpt")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The script's stdout, exit code and JSON table, run as a user runs it."""
    table = tmp_path_factory.mktemp("selfcheck") / "table.json"
    command = [sys.executable, os.path.join(ROOT, "tools", "selfcheck.py"), "--quick", "--device", "cpu",
               "--json", str(table)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines(), json.loads(table.read_text())


def status_of(lines, check):
    """The status column of the one table line whose check column is `check`."""
    found = [line.split("|") for line in lines if line.split("|")[0].strip() == check]
    assert len(found) == 1, f"no single row {check!r} in:\n" + "\n".join(lines)
    return found[0][-1].strip()


def test_quick_run_checks_every_shape_backend_and_variant(quick_run):
    lines, table = quick_run
    checks = [r["check"] for r in table["rows"]]
    for shape in ("spatial", "temporal"):
        rows = [c for c in checks if c.startswith(f"sdpa {shape} (")]
        assert [c.split()[-1] for c in rows] == ["flash", "efficient", "cudnn", "math", "default"]
        for check in rows:
            assert status_of(lines, check) in ("ok", "-")  # '-': not available on the CPU
        assert status_of(lines, rows[0]) == "ok"  # the CPU has a flash kernel
    for kind in ("video", "image"):
        for variant in VARIANTS:
            assert status_of(lines, f"train {kind} {variant}") == "ok"
    for variant in VARIANTS:
        assert status_of(lines, f"speed video {variant}") == "-"
    assert "skipped on CPU" in next(line for line in lines if line.startswith("largest image batch"))
    assert lines[-1].startswith("self-check passed") and table["passed"]


def test_nan_gradient_from_a_backend_fails_and_names_the_rows(monkeypatch, capsys):
    real_attend = selfcheck.attend

    def flash_with_nan_dq(q, k, v, grad_out, backend=None):  # as cuDNN's dq for some lengths (pytorch#139298)
        out, dq, dk, dv = real_attend(q, k, v, grad_out, backend)
        if backend == selfcheck.SDPBackend.FLASH_ATTENTION:
            dq[0, 0, 0, 0] = math.nan
        return [out, dq, dk, dv]

    monkeypatch.setattr(selfcheck, "attend", flash_with_nan_dq)
    monkeypatch.setattr(selfcheck, "check_train", lambda *args: ([], []))  # the run above covers them
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    assert selfcheck.main(["--device", "cpu"]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [line.split("|")[0].strip() for line in lines if line.endswith("| FAIL")]
    assert [(check.split()[1], check.split()[-1]) for check in failed] == [("spatial", "flash"),
                                                                         ("temporal", "flash")]
    default = next(line for line in lines if line.startswith("sdpa spatial") and " default " in line)
    assert default.endswith("| ok")  # PyTorch's own choice was not corrupted
    assert lines[-1] == "self-check FAILED: " + "; ".join(failed)


def test_gradient_error_reports_the_worst_parameter():
    reference = {"a": torch.ones(4), "b": torch.ones(2)}
    error, name = selfcheck.gradient_error({"a": torch.full((4,), 1.5), "b": torch.ones(2)}, reference)
    assert (error, name) == (0.5, "a")
    with_nan = {"a": torch.ones(4), "b": torch.tensor([1.0, math.nan])}
    error, name = selfcheck.gradient_error(with_nan, reference)
    assert math.isnan(error) and name == "b"
    assert selfcheck.gradient_error({"a": torch.ones(4)}, reference) == (math.inf, "b got no gradient")
