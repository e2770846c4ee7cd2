"""eval.py on a checkpoint trained here: every validation clip counted once, single-file prediction, and
one clear line for bad input."""

import json

import pytest
import torch

import data
import demo
import eval as evaluate_mod
import train
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


def test_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="is not a checkpoint of train.py"):
        evaluate_mod.main(["--ckpt", str(tmp_path / "ckpt.pt")])
    with pytest.raises(SystemExit, match="FileNotFoundError"):
        evaluate_mod.main(["--ckpt", str(tmp_path / "nope.pt")])
