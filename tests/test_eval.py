"""eval.py on a checkpoint trained here: every validation clip counted once, single-file prediction, and
one clear line for bad input."""

import json

import pytest
import torch

import data
import demo
import eval as evaluate_mod
import train
from helpers import spoil
from test_train import FAST


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "2", "--workers", "0"])
    return out


def test_eval_cli_counts_and_single_video(demo_dir, trained, capsys):
    out = trained
    evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--views", "1x3", "--workers", "0"])
    results = json.load(open(out / "eval.json"))
    assert set(results) == set(demo.NAMES)
    for n, r in results.items():
        val = data.build_dataset(n, demo_dir, "val", train=False, img_size=32, views=(1, 3))
        assert r["clips"] == len(val) and r["views"] == 3 and 0 <= r["top1"] <= r["top5"] <= 1
    video = data.build_dataset("demo_kinetics", demo_dir, "val", train=False, img_size=32).samples.path(0)
    capsys.readouterr()
    evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--video", video, "--head", "demo_kinetics"])
    lines = capsys.readouterr().out.strip().splitlines()
    classes = torch.load(out / "ckpt.pt", weights_only=True)["label_maps"]["demo_kinetics"]
    assert len(lines) == min(5, len(classes)) and all(line.split()[-1] in classes for line in lines)


def test_eval_on_the_training_split_counts_every_training_clip(demo_dir, trained):
    out = trained / "train_split.json"
    evaluate_mod.main(["--ckpt", str(trained / "ckpt.pt"), "--split", "train", "--views", "1x1", "--workers", "0",
                       "--datasets", "demo_imagenet", "--out", str(out)])
    result = json.load(open(out))["demo_imagenet"]
    assert result["clips"] == len(data.build_dataset("demo_imagenet", demo_dir, "train")) and result["views"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--video", "missing.mp4"], "cannot read missing.mp4"),
    (["--video", "README.md", "--head", "demo_imagenet"], "cannot read README.md"),
    (["--head", "k400", "--video", "x.mp4"], "not {'k400'}"),
    (["--datasets", "ssv2"], "not {'ssv2'}"),
])
def test_bad_input_is_one_line(trained, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        evaluate_mod.main(["--ckpt", str(trained / "ckpt.pt")] + flags)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind, says", [
    ("truncated", "is cut short"), ("empty", "is empty (0 bytes)"), ("garbage", "is not a PyTorch checkpoint"),
    ("zip", "is a zip archive, not a PyTorch checkpoint"), ("folder", "is a folder"), ("missing", "does not exist"),
    ("weights", "is not a checkpoint of train.py (it lacks"),
])
def test_not_a_checkpoint_is_one_line(tmp_path, kind, says):
    """What the file is, in one line; never torch's advice to unpickle it with weights_only=False."""
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.randn(1000)}, path)  # a state dict: not a checkpoint of train.py
    if kind == "missing":
        path.unlink()
    elif kind != "weights":
        spoil(path, kind)
    with pytest.raises(SystemExit) as e:
        evaluate_mod.main(["--ckpt", str(path)])
    msg = str(e.value)
    assert msg.startswith(f"error: --ckpt {path} {says}") and "\n" not in msg and "weights_only" not in msg, msg


@pytest.mark.parametrize("n, k, indices", [(18, 5, [0, 3, 7, 10, 14]), (10, 4, [0, 2, 5, 7]), (7, 7, range(7)),
                                           (7, 0, range(7)), (3, 10, range(3))])
def test_fixed_subset_is_evenly_spaced_and_the_same_every_time(n, k, indices):
    assert evaluate_mod.fixed_subset(n, k) == indices  # i * n // k: by hand
    assert evaluate_mod.fixed_subset(n, k) == evaluate_mod.fixed_subset(n, k)
