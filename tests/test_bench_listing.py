"""tools/bench_listing.py at 1/1000 of Kinetics' size: it runs, and what it generates is what it says."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_listing.py")


def test_listing_bench_at_a_thousandth_of_the_size(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, SCRIPT, "--scale", "0.001", "--rounds", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    # 650 rows; validation sets of 20 / 28 / 35 videos, the first 1 / 1 / 1 (5%, rounded down) in training too
    assert result["rows"] == 650 and result["left_out"] == {"total": 3, "of": {"k400": 1, "k600": 1, "k700": 1}}
    assert result["k710_rows"] == 240 + 383 + 542 and result["k710_videos"] == 650  # shared videos kept once
    assert set(result["seconds"]) == {"parse", "arrays with ids", "ids alone", "save", "load", "guard", "k710 merge"}
