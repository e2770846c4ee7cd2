"""eval.py on a checkpoint trained here: every validation clip counted once, single-file prediction, and
one clear line for bad input."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import demo
import eval as evaluate_mod
import model as M
import runtime
import train
from helpers import small_cfg, spoil
from media import tiny_video
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


def test_eval_on_another_data_dir_leaves_the_runs_listings_alone(demo_dir, trained, tmp_path):
    """The run's workers read its listings by file name: eval.py on a copy of the data lists the copy into
    files of its own, and the run's files keep their bytes and times."""
    listings = trained / "listings"
    before = {f: ((listings / f).read_bytes(), os.stat(listings / f).st_mtime_ns) for f in os.listdir(listings)}
    shutil.copytree(os.path.join(demo_dir, "demo_imagenet"), tmp_path / "copy" / "demo_imagenet")
    evaluate_mod.main(["--ckpt", str(trained / "ckpt.pt"), "--data_dir", str(tmp_path / "copy"), "--views", "1x1",
                       "--workers", "0", "--datasets", "demo_imagenet", "--out", str(tmp_path / "copy.json")])
    assert json.load(open(tmp_path / "copy.json"))["demo_imagenet"]["clips"] > 0
    assert {f: ((listings / f).read_bytes(), os.stat(listings / f).st_mtime_ns) for f in before} == before
    assert len(os.listdir(listings)) == len(before) + 2  # the copy's own listing: .npy and .json


class NoFloat64(TorchDispatchMode):
    """Refuses to make a float64 tensor, as a device without float64 (MPS) does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
            raise TypeError(f"{func} made a float64 tensor")
        return out


def test_evaluation_and_failure_counts_need_no_float64_and_keep_repeated_names_apart(tmp_path):
    """evaluate() and the failure counts of a run use no float64 (MPS has none); per-class accuracies are
    the hand count of each class, ImageNet's twice-used names told apart by their indices."""
    root = tmp_path / "mine"
    names = ["crane", "maillot", "crane", "maillot"]
    for i in range(8):
        tiny_video(root / f"{i}.mp4", 4)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for split in ("train", "val"):
        (root / f"{split}.csv").write_text("".join(f"{i}.mp4 {i % 4}\n" for i in range(8)))
    ds = data.build_dataset("mine", tmp_path, "val", frames=4, img_size=32, train=False, views=(1, 1))
    torch.manual_seed(0)
    model = M.TimeSformer(small_cfg(), heads={"mine": 4}).eval()
    normalize = data.Normalize("0.5", "0.5", "cpu")
    with NoFloat64():
        r = evaluate_mod.evaluate(model, ds, head="mine", normalize=normalize, device=torch.device("cpu"),
                                  batch_size=3, workers=0)
    with torch.no_grad():
        pred = torch.cat([model(normalize(ds[i]["x"]), head="mine") for i in range(8)]).argmax(-1)
    hits = [sum(int(pred[i]) == k for i in (k, k + 4)) / 2 for k in range(4)]
    assert r["per_class_top1"] == {"crane (0)": hits[0], "maillot (1)": hits[1], "crane (2)": hits[2],
                                   "maillot (3)": hits[3]}
    assert r["top1"] == sum(hits) / 4 == r["mean_class_top1"] and r["clips"] == 8 and r["failed"] == 0
    failures = runtime.Failures(["mine"], 0)
    failures.add("mine", ["a.mp4", "b.mp4"], ["sample 3 dropped: ..."])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # counted over the ranks, as with torchrun (a group of one here)
        with NoFloat64():
            totals = failures.totals(runtime.Runtime(0, 2, torch.device("cpu")))
    finally:
        dist.destroy_process_group()
    assert totals == {"failed": {"mine": 2}, "dropped": {"mine": 1}, "blank_steps": {"mine": 0}}


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
