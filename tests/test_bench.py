"""tools/bench.py --quick runs every section and prints its table and JSON line."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench.py")


def bench(tmp_path, *sections):
    # TMPDIR: the generated clips go to this test's folder, not a cache shared with other runs
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--section", *sections,
                             "--json", str(tmp_path / "bench.jsonl")],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = (tmp_path / "bench.jsonl").read_text().splitlines()
    assert [json.loads(ln)["section"] for ln in lines] == list(sections)
    for s in sections:
        assert f"\n## {s}  (" in result.stdout
    return result.stdout, {json.loads(ln)["section"]: json.loads(ln) for ln in lines}


def test_model_sections(tmp_path):
    out, results = bench(tmp_path, "train", "infer", "mfu", "memory")
    assert "| train clips/s |" in out and "| MFU |" in out
    assert results["infer"]["max_logit_diff"] < 1e-4  # same weights, same logits
    assert 0 < results["mfu"]["mfu"]


def test_data_section(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("av")
    out, results = bench(tmp_path, "data")
    sets = {k: v for k, v in results["data"].items() if isinstance(v, dict) and "files" in v}
    files = [(v["dataset"], v["files"]) for v in sets.values()]
    assert files == [("k400", "as downloaded"), ("k400", "GOP 16"), ("k400", "prepared"), ("ssv2", "as downloaded"),
                     ("ssv2", "prepared")]
    for name, r in sets.items():
        assert all(r["frame_exact"].values()), r  # every reader, ours on both paths, gave the decoded frames
        assert f"[{name}] {r['dataset']} clips/s per worker" in out
        assert set(r["clips_per_s"]) >= {"ours R=1", "ours R=2", "ours R=4", "ours R=1, OpenCV"}  # no timing
    assert "images/s" in out and "| ours R=1 | ours R=2 | ours R=4 | ours R=1, OpenCV |" in out
    assert "on the GOP-16 files | " in out and "| K400 alone | cover mix |" in out


def test_prepare_section(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("av")
    out, results = bench(tmp_path, "prepare")
    variants = [k for k in results["prepare"] if "prepared" in k]
    assert len(variants) == 5 and "--gop 4" in out and "--gop 16" in out and "--short_side 256" in out
    short = {k: min(int(v) for v in results["prepare"][k]["size"].split("x")) for k in variants}
    assert short[next(k for k in variants if "256" in k)] == 256 < short[next(k for k in variants if "gop 4" in k)]
    rate = {k: results["prepare"][k]["mbit_per_s"] for k in variants}
    assert rate[next(k for k in variants if "gop 4" in k)] > rate[next(k for k in variants if "gop 16" in k)]
