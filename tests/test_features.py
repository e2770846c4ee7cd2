"""features.py on a checkpoint trained here: each row is forward_features of the clip's test views averaged,
in the dataset's order with its path and label; the moving average of the weights when the run kept one;
every clip once over the ranks of a real two-process run; one file alone; a spoilt --ckpt in one line."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import features
import model as M
import train
from helpers import spoil
from test_train import FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "3", "--workers", "0",
                       "--ema", "0.5"])
    return out


def expected(ckpt, dataset, weights):
    """forward_features of each sample's test views, averaged: computed here, one sample at a time."""
    model = M.TimeSformer.from_pretrained({**ckpt, "model": ckpt[weights], "ema": None}, verbose=False).eval()
    normalize = data.Normalize(ckpt["config"]["mean"], ckpt["config"]["std"], "cpu")
    with torch.no_grad():
        return np.stack([model.forward_features(normalize(dataset[i]["x"])).mean(0).numpy()
                         for i in range(len(dataset))])


@pytest.mark.parametrize("name, split, live", [("demo_ssv2", "val", False), ("demo_imagenet", "train", True)])
def test_features_are_forward_features_of_the_views_in_dataset_order(demo_dir, trained, name, split, live):
    out = trained / "feats"
    features.main(["--ckpt", str(trained / "ckpt.pt"), "--datasets", name, "--split", split, "--workers", "0",
                   "--batch_size", "3", "--out", str(out)] + ["--live"] * live)
    got = np.load(out / f"{name}_{split}.npz")  # allow_pickle is False by default
    ds = data.build_dataset(name, demo_dir, split, train=False, img_size=32)
    assert got["paths"].tolist() == [ds.samples.path(i) for i in range(len(ds))]
    assert got["labels"].tolist() == ds.samples.labels.tolist() and got["ok"].all()
    assert got["classes"].tolist() == ds.classes and got["features"].shape == (len(ds), 96)
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    np.testing.assert_allclose(got["features"], expected(ckpt, ds, "model" if live else "ema"), atol=1e-5)
    other = expected(ckpt, ds, "ema" if live else "model")
    assert np.abs(got["features"] - other).max() > 1e-3  # the other weights give other features


def test_two_processes_extract_each_clip_once(demo_dir, trained, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "features.py",
           "--ckpt", str(trained / "ckpt.pt"), "--datasets", "demo_kinetics", "--workers", "1", "--batch_size", "2",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone writes
    got = np.load(tmp_path / "demo_kinetics_val.npz")
    ds = data.build_dataset("demo_kinetics", demo_dir, "val", train=False, img_size=32)
    assert got["paths"].tolist() == [ds.samples.path(i) for i in range(len(ds))]  # each once, in order
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    np.testing.assert_allclose(got["features"], expected(ckpt, ds, "ema"), atol=1e-5)


def test_one_file(demo_dir, trained, tmp_path):
    ds = data.build_dataset("demo_kinetics", demo_dir, "val", train=False, img_size=32)
    features.main(["--ckpt", str(trained / "ckpt.pt"), "--video", ds.samples.path(2), "--out", str(tmp_path)])
    got = np.load(tmp_path / (os.path.basename(ds.samples.path(2)) + ".npz"))
    ckpt = torch.load(trained / "ckpt.pt", weights_only=True)
    np.testing.assert_allclose(got["features"][0], expected(ckpt, ds, "ema")[2], atol=1e-5)
    assert got["paths"].tolist() == [ds.samples.path(2)]


@pytest.mark.parametrize("kind, says", [("truncated", "is cut short"), ("empty", "is empty (0 bytes)"),
                                        ("garbage", "is not a PyTorch checkpoint")])
def test_not_a_checkpoint_is_one_line(trained, tmp_path, kind, says):
    path = tmp_path / "ckpt.pt"
    path.write_bytes((trained / "ckpt.pt").read_bytes())
    spoil(path, kind)
    with pytest.raises(SystemExit) as e:
        features.main(["--ckpt", str(path), "--workers", "0"])
    msg = str(e.value)
    assert msg.startswith(f"error: --ckpt {path} {says}") and "\n" not in msg and "weights_only" not in msg, msg
    assert not (tmp_path / "features").exists()
