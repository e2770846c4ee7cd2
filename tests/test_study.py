"""tools/study_data_limited.py in a reduced form (one N, one seed, a few steps, small batches): every row of
the design is run, and every run's numbers land in the table and in study.json."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import study_data_limited as study  # noqa: E402


def test_reduced_study_runs_every_row_and_records_every_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    study.main(["--n", "2", "--seeds", "0", "--steps_per_set", "3", "--val_per_class", "1", "--workers", "0",
                "--batch_size", "4", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.load(open(tmp_path / "study.json"))
    runs = {(r["training"], r["dataset"]): r for r in result["runs"]}
    assert set(runs) == {(row, v) for row in study.MIXES for v in study.VIDEO}
    for (row, v), r in runs.items():
        assert {"best_val", "best_step", "train", "val", "test", "steps"} <= set(r)
        assert all(0 <= r[k] <= 100 for k in ("best_val", "train", "val", "test"))
        assert r["steps"] == 3 * {"alone": 1, "images, then alone": 1}.get(row, len(study.MIXES[row] or []))
        assert r["best_val"] >= r["val"]  # the end is one of the validated points
    for row in study.MIXES:
        assert f"| 2 | {row} |" in out
    assert os.path.getsize(tmp_path / "gain.png") > 1000
    assert (tmp_path / "images" / "seed0" / "ckpt.pt").exists()  # the image pre-training, shared
