"""The README's "Fork it" section, each recipe done as it says: a dataset of your own with Kinetics-style
sampling (by flag or by one registry line), a changed mix and its epochs, a new attention type that trains
and is counted, and the linear probe on features.py output, run from the README's own code block."""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

import data
import eval as evaluate_mod
import features
import model as M
import train
from helpers import reference_attention, small_cfg
from media import noise_frames, write_video
from test_train import FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--log_every", "1", "--eval_every", "0", "--final_eval", "none", "--workers", "0"]


class Counted:
    """A function that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def own_videos(root):
    """<root>/mine/{train,val}/<class>/*.mp4: a folder of your own, 40 frames at 12 fps each."""
    for split, n in (("train", 4), ("val", 2)):
        for c in ("jump", "sit"):
            for i in range(n):
                write_video(root / "mine" / split / c / f"{i}.mp4", noise_frames(40, 32, 40, seed=i))


@pytest.mark.parametrize("how", ["flag", "registry line"])
def test_your_own_dataset_trains_and_tests_with_kinetics_sampling(tmp_path, monkeypatch, capsys, how):
    own_videos(tmp_path)
    kinetics, segment = Counted(data.kinetics_indices), Counted(data.segment_indices)
    monkeypatch.setattr(data, "kinetics_indices", kinetics)
    monkeypatch.setattr(data, "segment_indices", segment)
    if how == "flag":
        asked = ["--sampling", "mine=kinetics:8"]
    else:  # the README's one line, as a fork would add it to data.py's registry
        monkeypatch.setitem(data.SPECS, "mine", data.DatasetSpec("mine", "video", "kinetics", rate=8))
        asked = []
    out = tmp_path / "out"
    train.main(["--recipe", "demo", "--datasets", "mine", "--data_dir", str(tmp_path), "--out_dir", str(out),
                "--batch_size", "2", "--max_steps", "2"] + RUN + asked)
    row = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  mine ")][0]
    assert row[9] == "kinetics/8"  # the start-up table's sampling column
    assert kinetics.calls > 0 and segment.calls == 0
    if how == "flag":  # eval.py learns the run's sampling from ckpt.pt
        kinetics.calls = 0
        evaluate_mod.main(["--ckpt", str(out / "ckpt.pt"), "--views", "1x1", "--workers", "0"])
        assert kinetics.calls == 4 and segment.calls == 0  # the 4 validation videos, as trained


def test_change_the_mix_and_see_each_datasets_epochs_before_training(demo_dir, tmp_path, capsys):
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--workers", "0", "--weights",
                       "demo_ssv2=2", "--max_steps", "40", "--dataset_batch_size", "demo_imagenet=16",
                       "--stop_at", "0"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("  demo_")}
    sizes = {n: len(data.build_dataset(n, demo_dir, "train")) for n in rows}
    # 40 steps at weights 1, 2, 1: 10, 20 and 10; batches 4, 4 and the 16 asked for
    for n, steps, batch in [("demo_kinetics", 10, 4), ("demo_ssv2", 20, 4), ("demo_imagenet", 10, 16)]:
        assert (rows[n][4], rows[n][7]) == (str(batch), str(steps))
        assert rows[n][8] == f"{steps * batch / sizes[n]:.1f}"  # epochs
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 0  # nothing trained yet


class SpaceThenMean(M.Block):
    """A new attention type as the README says: spatial attention per frame, the frames' CLS outputs averaged
    into the one CLS token (divided space-time without its temporal step)."""

    def attend(self, cls, x):
        B, T, N, D = x.shape
        xs = torch.cat([cls.expand(B, T, D).unsqueeze(2), x], dim=2)  # (B, T, 1+N, D)
        xs = rearrange(self.attn(self.norm1(rearrange(xs, "b t n d -> (b t) n d"))), "(b t) n d -> b t n d", b=B)
        keep = self.keep(x)
        cls = cls + M.drop_path(xs[:, :, 0].mean(dim=1, keepdim=True), keep)
        x = x + M.drop_path(xs[:, :, 1:], keep)
        return cls, x


def test_a_new_attention_type_trains_and_is_counted(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(M.ATTENTION_TYPES, "space_then_mean", SpaceThenMean)  # the one registry entry
    out = tmp_path / "out"
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--workers", "0", "--max_steps", "3",
                       "--attention", "space_then_mean"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["model_config"]["attention"] == "space_then_mean"
    assert not any("temporal" in k for k in ckpt["model"]) and "time_embed" in ckpt["model"]
    # flops() counts the new code: what PyTorch's counter sees on a real forward (softmax written as matmuls)
    m = M.TimeSformer(small_cfg(attention="space_then_mean"), heads={"a": 5}).eval()
    monkeypatch.setattr(F, "scaled_dot_product_attention", reference_attention)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(1, 3, 4, 32, 32))
    assert counter.get_total_flops() == 2 * m.flops(4, 32, head="a")
    divided = M.TimeSformer(small_cfg(), heads={"a": 5})
    assert m.flops(4, 32) < divided.flops(4, 32)  # no temporal attention to pay for


def test_the_readme_linear_probe_runs_on_features_py_output(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", "out", "--workers", "0", "--max_steps", "2",
                       "--datasets", "demo_kinetics"])
    for split in ("train", "val"):
        features.main(["--ckpt", "out/ckpt.pt", "--datasets", "demo_kinetics", "--split", split, "--workers", "0"])
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"linear probe.*?```python\n(.*?)```", readme, re.S | re.I).group(1)
    scope = {}
    exec(code, scope)  # the README's block as it stands
    printed = capsys.readouterr().out
    top1 = float(re.search(r"linear probe, val top-1: (\d+\.\d)%", printed).group(1))
    assert 0 <= top1 <= 100
    fitted = (scope["X"] @ scope["W"]).argmax(1)  # the probe fits the training features it was solved on
    assert (fitted == scope["tr"]["labels"]).mean() > 0.9
