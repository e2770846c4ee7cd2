"""train.py end to end on the demo data: exact resume, one write per step, a real two-process torchrun (gloo)
run, head isolation under DDP, one host sync per step, argument errors."""

import argparse
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import data
import loaders
import demo
import model as M
import recipes
import runtime
import train
from helpers import hub_cache, spoil
from media import tiny_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ",".join(demo.NAMES)
# a short, fast run on the demo data: tiny batches, a few steps, no final multi-view test unless asked
FAST = ["--recipe", "demo", "--datasets", DEMO, "--batch_size", "4", "--lr", "1e-3", "--warmup_steps", "2", "--log_every", "1",
        "--eval_every", "0", "--final_eval", "none", "--drop_path", "0.1"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("extra", [[], ["--num_sample", "2"], ["--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9"]])
def test_resume_is_bit_identical(demo_dir, tmp_path, extra):
    """8 steps straight == 4 steps, stop, 4 more from the checkpoint (CPU, one process); also when each
    video gives 2 clips (repeated sampling), and with mixup, cutmix and a moving average of the weights."""
    common = FAST + extra + ["--data_dir", demo_dir, "--max_steps", "8", "--workers", "0", "--save_every", "100"]
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_at", "4"])
    assert load(tmp_path / "b" / "ckpt.pt")["step"] == 4
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    assert b["sampler"] == {"micro": 8}
    if "--ema" in extra:
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
        assert not torch.equal(a["ema"]["blocks.0.attn.qkv.weight"], a["model"]["blocks.0.attn.qkv.weight"])


def test_a_step_is_written_once(demo_dir, tmp_path, monkeypatch):
    """--stop_at on a --save_every step writes that checkpoint once (twice, ckpt.prev.pt would hold it too), and
    a run resumed at its --stop_at step writes nothing: ckpt.pt holds that step already."""
    saves, save = [], runtime.CheckpointFiles.save

    def counted(self, state):
        saves.append(state["step"])
        save(self, state)

    monkeypatch.setattr(runtime.CheckpointFiles, "save", counted)
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "8", "--save_every", "2",
                     "--workers", "0"]
    train.main(common + ["--stop_at", "4"])
    assert saves == [2, 4]
    assert load(tmp_path / "ckpt.pt")["step"] == 4 and load(tmp_path / "ckpt.prev.pt")["step"] == 2
    before = {f: (tmp_path / f).read_bytes() for f in ("ckpt.pt", "ckpt.prev.pt")}
    train.main(common + ["--stop_at", "4"])
    assert saves == [2, 4] and {f: (tmp_path / f).read_bytes() for f in before} == before


def test_ema_is_the_moving_average_of_the_weights_after_each_step(demo_dir, tmp_path):
    """--ema 0.7: after step k, ema = 0.7 ema + 0.3 weights, from ema = the initial weights; the weights of
    each step from runs that stop there (resume is exact, so they are the steps of one run)."""
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "8", "--workers", "0",
                     "--ema", "0.7"]
    weights, emas = [], []
    for k in range(4):
        train.main(common + ["--stop_at", str(k)])
        ckpt = load(tmp_path / "ckpt.pt")
        weights.append(ckpt["model"])
        emas.append(ckpt["ema"])
    expect = dict(weights[0])
    for k in range(1, 4):
        expect = {n: 0.7 * expect[n] + 0.3 * weights[k][n] for n in expect}
        for n in expect:
            torch.testing.assert_close(emas[k][n], expect[n], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(emas[0][n], weights[0][n]) for n in expect)


def test_a_copy_for_the_moving_average_runs_its_own_weights_after_compile_trunk(monkeypatch):
    """compile_trunk keeps a compiled forward_features holding the live model; a deepcopy of the model would
    keep that function, and its copy would run the live weights in training."""
    def fake_compile(fn, **kw):
        return lambda *a: fn(*a)  # a closure over the bound method, as torch.compile's wrapper is
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = M.TimeSformer(M.make_config("demo", depth=1), heads={"a": 3})
    model.compile_trunk()
    ema, trap = train.ema_copy(model), copy.deepcopy(model)
    x = torch.randn(2, 3, 4, 32, 32)
    before = ema(x, head="a")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(ema(x, head="a"), before) and not torch.equal(model(x, head="a"), before)
    assert torch.equal(trap.compiled_trunk(x), model.forward_features(x))  # the deepcopy's trap


def test_a_checkpoint_without_lr_scales_resumes(demo_dir, tmp_path):
    """Checkpoints written before --layer_decay existed have no lr_scale in their optimizer's groups."""
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "4", "--workers", "0"]
    train.main(common + ["--stop_at", "2"])
    ckpt = load(tmp_path / "ckpt.pt")
    for group in ckpt["optimizer"]["param_groups"]:
        del group["lr_scale"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train.main(common)
    assert load(tmp_path / "ckpt.pt")["step"] == 4


def test_layer_decay_sets_each_groups_lr(demo_dir, tmp_path):
    out = tmp_path / "o"
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "8", "--workers", "0",
                       "--layer_decay", "0.5", "--stop_at", "2"])
    ckpt, args = load(out / "ckpt.pt"), train.get_args(FAST + ["--max_steps", "8", "--layer_decay", "0.5"])
    groups = ckpt["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.5 ** k for k in (5, 4, 3, 2, 1, 0)]  # demo: depth 4
    for g in groups:  # the lr of the last step taken (step 1)
        assert g["lr"] == train.get_lr(1, args) * g["lr_scale"]


def test_epochs_set_the_weights_and_the_steps():
    """Steps = epochs x samples / samples a step (the global batch over R clips a sample), by hand: 30 x 240,000 /
    (64 / 2) = 225,000; 20 x 169,600 / 64 = 53,000; 1 x 11,060,000 / 256 = 43,203.125, rounded."""
    def budgets(*flags, args=None):
        args = args or train.get_args(["--datasets", "a,b,c", "--epochs", "a=30,b=20,c=1", *flags])
        return recipes.budgets(args, ["a", "b", "c"], [range(240_000), range(169_600), range(11_060_000)],
                               {"a": 64, "b": 64, "c": 256}, {"a": 2, "b": 1, "c": 1}, world=1)

    args = train.get_args(["--datasets", "a,b,c", "--epochs", "a=30,b=20,c=1"])
    assert budgets(args=args) == ([225_000.0, 53_000.0, 43_203.0], 321_203)
    assert args.weights == "a=225000,b=53000,c=43203"  # the run's config records the weights it ran
    weights, steps = budgets()
    assert [data.steps_before(steps, d, weights) for d in range(3)] == [225_000, 53_000, 43_203]  # the table's
    assert budgets("--max_steps", "321203", "--weights", "225000,53000,43203") == budgets()  # agreeing: fine
    cover_steps = str(recipes.RECIPES["cover"]["max_steps"])  # typed, the recipe's value is compared too
    for flags, says in [(["--max_steps", "1000"], "makes 321203 steps in all, not --max_steps 1000"),
                        (["--max_steps", cover_steps], f"makes 321203 steps in all, not --max_steps {cover_steps}"),
                        (["--weights", "c=2"], "not in the ratio of --weights c=2")]:
        with pytest.raises(SystemExit, match=says):
            budgets(*flags)


def test_lr_factor_scales_the_lr_of_the_steps_that_train_its_dataset(demo_dir, tmp_path):
    """The lr of step s is get_lr(s) x the factor of s's dataset x the group's layer-decay scale; the log says it."""
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "8", "--workers", "0",
                     "--lr_factor", "demo_ssv2=0.25,demo_imagenet=3", "--layer_decay", "0.5", "--weights", "1,1,1"]
    args, factor = train.get_args(common), {"demo_kinetics": 1.0, "demo_ssv2": 0.25, "demo_imagenet": 3.0}
    for stop in (1, 2, 3):  # the last step taken is stop - 1: round robin, one of each dataset
        train.main(common + ["--stop_at", str(stop)])
        lr = train.get_lr(stop - 1, args) * factor[demo.NAMES[stop - 1]]
        for group in load(tmp_path / "ckpt.pt")["optimizer"]["param_groups"]:
            assert group["lr"] == lr * group["lr_scale"]
        logged = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"lr"' in line][-1]
        assert logged["step"] == stop and logged["lr"] == lr


def test_budgets_and_lr_factors_resume_to_the_bit(demo_dir, tmp_path):
    """--epochs sets the run's length from the listed sizes (demo: 36 / 36 / 48 samples, batches of 4 / 4 / 8):
    0.25 epoch each is 2 + 2 + 2 steps (2.25 -> 2, 2.25 -> 2, 1.5 -> 2); straight == stopped at 3 and resumed."""
    common = FAST + ["--data_dir", demo_dir, "--workers", "0", "--save_every", "100", "--epochs", "0.25",
                     "--lr_factor", "demo_imagenet=0.1,demo_ssv2=3"]
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_at", "3"])
    train.main(common + ["--out_dir", str(tmp_path / "b")])
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == a["config"]["max_steps"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for i in a["optimizer"]["state"]
               for x, y in zip(a["optimizer"]["state"][i].values(), b["optimizer"]["state"][i].values()))


def torchrun(args, timeout=300, launcher=(), script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher, script] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_torchrun_two_processes(demo_dir, tmp_path):
    """A real 2-process gloo run: the step-0 checkpoint, one step that trains only the head of step 0's dataset
    (AdamW with weight decay must leave the other heads bit-identical), then the rest with the multi-view test."""
    out = str(tmp_path / "run")
    common = FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "6", "--workers", "1",
                     "--weight_decay", "0.1", "--optimizer", "adamw"]
    log = torchrun(common + ["--stop_at", "0"], launcher=["--max-restarts=1"])
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in log  # restarts on torchrun's shared store: warned (README)
    before = load(os.path.join(out, "ckpt.pt"))
    torchrun(common + ["--stop_at", "1"])
    after = load(os.path.join(out, "ckpt.pt"))
    names = demo.NAMES
    first = names[data.schedule(0, recipes.dataset_weights(train.get_args(common), names))]  # the dataset of step 0
    others = [n for n in names if n != first]
    assert after["step"] == 1
    for n in others:  # step 0 belonged to one dataset only
        assert torch.equal(before["model"][f"heads.{n}.weight"], after["model"][f"heads.{n}.weight"])
        assert torch.equal(before["model"][f"heads.{n}.bias"], after["model"][f"heads.{n}.bias"])
    assert not torch.equal(before["model"][f"heads.{first}.weight"], after["model"][f"heads.{first}.weight"])
    assert not torch.equal(before["model"]["blocks.0.attn.qkv.weight"], after["model"]["blocks.0.attn.qkv.weight"])

    log = torchrun(common + ["--final_eval", "multiview"])
    assert "resuming from" in log and "(step 1)" in log
    assert load(os.path.join(out, "ckpt.pt"))["step"] == 6
    steps = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # logged once (rank 0), continuing after resume
    assert all(0 <= s["data_wait"] <= 1 and s["clips_per_s"] > 0 for s in steps)  # the share spent waiting for data
    assert "workers needed" in log and log.count("demo_ssv2 ") >= 2  # the start-up estimate, per dataset
    results = json.load(open(os.path.join(out, "eval.json")))
    for n in demo.NAMES:  # every validation clip counted exactly once over the two ranks
        val = data.build_dataset(n, demo_dir, "val", train=False, img_size=32)
        assert results[n]["clips"] == len(val) and results[n]["failed"] == 0
        assert results[n]["views"] == val.num_views


LOG_KEYS = """
import json, os, sys
sys.path.insert(0, {root!r})
import loaders, train

read = loaders.MultiDataset.__getitem__

def logged(self, key):  # every sample key the training loader reads, per rank
    with open(os.path.join({out!r}, "rank" + os.environ["RANK"]), "a") as f:
        f.write(json.dumps([int(k) for k in key] + [self.num_sample[key[0]]]) + "\\n")
    return read(self, key)

loaders.MultiDataset.__getitem__ = logged
train.main(sys.argv[1:])
"""


def test_without_pyav_the_same_run_reads_with_opencv(demo_dir, tmp_path):
    """PyAV is optional: hidden from every process (loader workers too), a run names OpenCV's reader and
    trains to the same weights, bit for bit, as with PyAV's seeking reader (the same pixels)."""
    (tmp_path / "noav").mkdir()
    (tmp_path / "noav" / "av.py").write_text("raise ImportError('PyAV hidden by the test')\n")
    weights, logs = [], []
    for hide in (False, True):
        out = tmp_path / f"run{hide}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "noav") if hide else ""}
        cmd = [sys.executable, "train.py", *FAST, "--data_dir", demo_dir, "--out_dir", str(out), "--max_steps", "3",
               "--workers", "1"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        logs.append(r.stdout)
        weights.append(load(out / "ckpt.pt")["model"])
    assert "video reader: PyAV" in logs[0] and "video reader: OpenCV" in logs[1] and "pip install av" in logs[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_torchrun_with_repeated_sampling_reads_each_video_once_an_epoch(demo_dir, tmp_path):
    """2 processes, --num_sample 2, batch 4 clips: 2 videos a step over the ranks. One epoch of demo_ssv2 in
    steps reads every video exactly once, on one rank, and takes 2 clips from it."""
    n = len(data.build_dataset("demo_ssv2", demo_dir, "train"))
    script = tmp_path / "launch.py"
    script.write_text(LOG_KEYS.format(root=ROOT, out=str(tmp_path)))
    torchrun(["--recipe", "demo", "--datasets", "demo_ssv2", "--data_dir", demo_dir, "--out_dir", str(tmp_path / "o"),
              "--batch_size", "4", "--num_sample", "2", "--max_steps", str(n // 2), "--workers", "0",
              "--final_eval", "none", "--eval_every", "0"], script=str(script))
    keys = {r: [json.loads(line) for line in open(tmp_path / f"rank{r}")] for r in (0, 1)}
    assert len(keys[0]) == len(keys[1]) == n // 2  # one video a step on each rank
    assert sorted(k[1] for r in keys for k in keys[r]) == list(range(n))
    assert all(k[3] == 2 for r in keys for k in keys[r])  # clips taken from each
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl") if '"loss"' in line]
    assert log[-1]["step"] == n // 2


def mostly_unreadable(tmp_path):
    """<tmp_path>/data/mine: 16 training videos, 14 of them empty files, so that some samples and all their
    substitutes fail (seed 0: a micro-batch of 2 loses both); its val split lists a file that is not there
    and a label that train does not have."""
    root = tmp_path / "data" / "mine"
    for i in range(16):
        if i < 2:
            tiny_video(root / f"{i}.mp4")
        else:
            (root / f"{i}.mp4").write_bytes(b"")
    (root / "train.csv").write_text("".join(f"{i}.mp4 {i % 2}\n" for i in range(16)))
    (root / "val.csv").write_text("0.mp4 0\n1.mp4 1\ngone.mp4 0\n0.mp4 5\n")
    return str(tmp_path / "data")


def dropped_in(data_dir, keys):
    """Which of the sample keys (d, index, seed) the dataset drops, asked of the dataset itself."""
    ds = data.build_dataset("mine", data_dir, "train", frames=8, img_size=32)
    return [bool(ds[tuple(key[1:3])]["dropped"]) for key in keys]


def test_a_sample_with_no_readable_substitute_is_dropped_counted_and_dropped_again_on_resume(tmp_path, capsys):
    """The run goes on one sample short (a micro-batch that lost both takes part as one blank clip at zero
    weight); log.jsonl and the checkpoint count the dropped samples; a resume drops the same ones and ends
    on the same weights. The start-up table shows the val split's problems, listed anew or from the cache."""
    data_dir = mostly_unreadable(tmp_path)
    common = FAST + ["--datasets", "mine", "--data_dir", data_dir, "--max_steps", "8", "--grad_accum", "2",
                     "--workers", "0", "--save_every", "100"]
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    listed = capsys.readouterr().out
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_at", "4"])
    capsys.readouterr()
    train.main(common + ["--out_dir", str(tmp_path / "b")])
    cached = capsys.readouterr().out
    smp = data.MultiDatasetBatchSampler([16], [2], grad_accum=2)  # batch 4: 2 samples a micro-batch, seed 0
    dropped = [dropped_in(data_dir, smp.batch(m)) for m in range(16)]
    assert any(all(d) for d in dropped) and not any(all(dropped[m] + dropped[m + 1]) for m in range(0, 16, 2))
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl") if '"loss"' in line]
    assert [r["dropped"]["mine"] for r in log] == [sum(map(sum, dropped[:2 * s])) for s in range(1, 9)]
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["dropped"] == b["dropped"] == {"mine": sum(map(sum, dropped))} and a["failed"] == b["failed"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for out in (listed, cached):
        [row] = [line for line in out.splitlines() if line.startswith("  mine ")]
        assert row.endswith("problems: {'val': {'missing': 1, 'unknown_label': 1}}"), row


def test_a_run_resumed_on_another_number_of_processes_reads_on_where_it_stopped(tmp_path, monkeypatch):
    """3 steps on 2 processes (seed 0: a rank whose micro-batch lost both samples takes part in the step as
    one blank clip), then 3 on one process: the samples read, with their seeds, are the ones a single
    process reads in 6 steps. Each dataset's position is the samples read over all ranks."""
    data_dir = mostly_unreadable(tmp_path)
    common = FAST + ["--datasets", "mine", "--data_dir", data_dir, "--max_steps", "6", "--workers", "0"]
    script = tmp_path / "launch.py"
    script.write_text(LOG_KEYS.format(root=ROOT, out=str(tmp_path)))
    log = torchrun(common + ["--out_dir", str(tmp_path / "b"), "--stop_at", "3"], script=str(script))
    two = [json.loads(line)[:3] for r in (0, 1) for line in open(tmp_path / f"rank{r}")]
    rank1 = [json.loads(line)[:3] for line in open(tmp_path / "rank1")]
    assert any(all(dropped_in(data_dir, rank1[m:m + 2])) for m in range(0, 6, 2)) and "[rank 1] warning: mine:" in log
    read, logged = [], loaders.MultiDataset.__getitem__
    monkeypatch.setattr(loaders.MultiDataset, "__getitem__", lambda self, key: read.append(list(key)) or
                        logged(self, key))
    train.main(common + ["--out_dir", str(tmp_path / "b")])
    resumed = list(read)
    read.clear()
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    assert len(read) == 6 * 4 and sorted(two + resumed) == sorted(read)


def blank_steps(data_dir, steps, world=1):
    """The steps, one sample on each of `world` ranks, whose every sample the dataset drops."""
    ranks = [data.MultiDatasetBatchSampler([16], [1], rank=r, world=world) for r in range(world)]
    return [m for m in range(steps) if all(dropped_in(data_dir, [s.batch(m)[0] for s in ranks]))]


def test_a_step_that_lost_every_sample_trains_nothing_and_the_run_goes_on(tmp_path, capsys):
    """--batch_size 1 on a mostly unreadable set: a step whose one sample was dropped trains nothing (zero
    loss; the loss curve skips it), says so in a line and is counted (log.jsonl, ckpt.pt); the run reaches
    --max_steps, and stopped at such a step and resumed it ends on the same weights, bit for bit."""
    data_dir = mostly_unreadable(tmp_path)
    blank = blank_steps(data_dir, 12)
    assert blank[:3] == [1, 6, 7] and len(blank) < 12  # seed 0: the first step reads, step 1 loses its sample
    common = FAST + ["--datasets", "mine", "--data_dir", data_dir, "--max_steps", "12", "--batch_size", "1",
                     "--workers", "0", "--save_every", "100"]
    train.main(common + ["--out_dir", str(tmp_path / "a")])
    said = capsys.readouterr().out
    told = re.findall(r"warning: step (\d+) trained nothing: every sample of mine was dropped, on every rank", said)
    assert [int(s) for s in told] == blank
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl") if '"loss"' in line]
    assert [r["blank_steps"]["mine"] for r in log] == [sum(m < s for m in blank) for s in range(1, 13)]
    assert all(log[m]["loss"] == log[m - 1]["loss"] for m in blank)  # record m is after step m
    train.main(common + ["--out_dir", str(tmp_path / "b"), "--stop_at", str(blank[1])])
    train.main(common + ["--out_dir", str(tmp_path / "b")])  # resumed at a step that trains nothing
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 12 and a["blank_steps"] == b["blank_steps"] == {"mine": len(blank)}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in a["optimizer"]["state"]]
    assert all(torch.equal(x[k], y[k]) for x, y in moments for k in x)


def test_a_compiled_run_whose_batches_lost_samples_compiles_one_graph(tmp_path):
    """--compile on a mostly unreadable set, 3 samples a step (seed 0: steps of 3, 2 and 1 clips, and blank ones):
    the full batch runs the one graph, the others the plain trunk; log.jsonl counts 1 graph and no recompile."""
    data_dir = mostly_unreadable(tmp_path)
    smp = data.MultiDatasetBatchSampler([16], [3])
    kept = {3 - sum(dropped_in(data_dir, smp.batch(m))) for m in range(6)}
    assert {3, 2, 1} <= kept, kept  # batches of every size
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()
    train.main(FAST + ["--datasets", "mine", "--data_dir", data_dir, "--max_steps", "6", "--batch_size", "3",
                       "--workers", "0", "--compile", "eager", "--out_dir", str(tmp_path / "o")])
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl") if '"loss"' in line]
    assert log[-1]["compile"] == {"graphs": 1, "recompiles": 0, "graph_breaks": 0} and log[-1]["dropped"]["mine"] > 0
    torch._dynamo.reset()


NCCL_AVG = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import train

reduce = dist.all_reduce


def nccl_avg(tensor, op=dist.ReduceOp.SUM, **kw):
    # NCCL averages floats as a PreMulSum: each rank's value times float(1 / ranks), summed in float. As
    # {ranks} ranks would: each of the 2 stands for {ranks} // 2 of them.
    if op != dist.ReduceOp.AVG or not tensor.is_floating_point():
        return reduce(tensor, op=op, **kw)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    total, scale = torch.zeros_like(tensor), torch.tensor(1 / {ranks}, dtype=tensor.dtype)
    for part in parts:
        for _ in range({ranks} // len(parts)):
            total = total + part * scale
    tensor.copy_(total)


dist.all_reduce = nccl_avg
train.main(sys.argv[1:])
"""


def test_a_step_that_lost_every_sample_on_every_rank_is_told_whatever_the_backend_rounds(tmp_path):
    """The ranks tell each other in the step's one all_reduce (AVG) whether they kept a sample. NCCL averages
    floats as a sum of values each times 1/ranks, so an average of 1s is not 1.0 for many numbers of ranks
    (12: 0.99999988): a flag must be read as 0 or not 0. Two processes whose AVG rounds as 12 ranks' would:
    the steps where both ranks lost their sample are the ones counted."""
    data_dir = mostly_unreadable(tmp_path)
    blank = blank_steps(data_dir, 6, world=2)
    assert blank == [3, 5]  # seed 0, one sample a rank
    script = tmp_path / "launch.py"
    script.write_text(NCCL_AVG.format(root=ROOT, ranks=12))
    out = torchrun(FAST + ["--datasets", "mine", "--data_dir", data_dir, "--max_steps", "6", "--batch_size", "2",
                           "--workers", "0", "--out_dir", str(tmp_path / "o")], script=str(script))
    assert [int(s) for s in re.findall(r"warning: step (\d+) trained nothing", out)] == blank
    log = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl") if '"loss"' in line]
    assert [r["blank_steps"]["mine"] for r in log] == [0, 0, 0, 1, 1, 2] and log[-1]["step"] == 6


@pytest.mark.parametrize("flags, message", [
    (["--datasets", "nosuchset"], "nosuchset"),
    (["--frames", "0"], "--frames"),
    (["--img_size", "30"], "multiple of the patch size"),
    (["--batch_size", "5", "--grad_accum", "2"], "must be multiples of 2"),
    (["--resume"], "no checkpoint"),
    (["--weights", "1,2"], "--weights 1,2: one value, one per dataset (3), or name=value pairs"),
    (["--model", "huge"], "not a preset"),
    (["--weights", "demo_ssv2=-1"], "--weights demo_ssv2=-1: each dataset's weight must be positive"),
    (["--mixup", "demo_ssv2=0.8,0.5"], "--mixup demo_ssv2=0.8,0.5: one value, one per dataset"),
    (["--cutmix", "demo_ssv2=big"], "--cutmix demo_ssv2=big: numbers expected"),
    (["--sampling", "demo_ssv2=window"], "demo_ssv2=window: say kinetics, kinetics:RATE or segment"),
    (["--sampling", "demo_ssv2=kinetics:0"], "kinetics:RATE"),
    (["--sampling", "demo_imagenet=kinetics"], "holds images: --sampling is for video datasets"),
    (["--dataset_batch_size", "k400=8"], "not in --datasets"),
    (["--num_sample", "0"], "--num_sample 0: whole numbers >= 1"),
    (["--num_sample", "demo_ssv2=2,k400=2"], "not in --datasets"),
    (["--num_sample", "2", "--batch_size", "6", "--grad_accum", "2"], "--num_sample"),
    (["--init", "README.md"], "--init README.md"),
    (["--sample_time_limit", "600"], "--sample_time_limit 600: seconds in (0, 300]"),
    (["--sample_time_limit", "301"], "--sample_time_limit 301: seconds in (0, 300]"),
    (["--save_every", "0"], "--save_every 0 must be >= 1 (steps) or minutes (15min)"),
    (["--save_every", "0min"], "--save_every 0 must be >= 1 (steps) or minutes (15min)"),  # as 0 steps
    (["--ddp"], "--ddp joins torchrun's process group: launch as torchrun --nproc_per_node=1 train.py --ddp"),
    (["--epochs", "demo_ssv2=0"], "--epochs demo_ssv2=0: each dataset's budget must be a number of epochs > 0"),
    (["--epochs", "demo_ssv2=2"], "give every dataset in --datasets its epochs (one number for all, or name=epochs "
                                  "for demo_kinetics, demo_imagenet too)"),
    (["--epochs", "k400=3"], "--epochs k400=3: a name not in --datasets"),
    (["--lr_factor", "demo_ssv2=-1"], "--lr_factor demo_ssv2=-1: each factor must be a number > 0"),
    (["--lr_factor", "k400=0.1"], "--lr_factor k400=0.1: a name not in --datasets"),
    (["--epochs", "1", "--max_steps", "5"], "steps in all, not --max_steps 5: drop one of the two"),
    (["--epochs", "1", "--weights", "1,1,3"], "not in the ratio of --weights 1,1,3: drop one of the two"),
    (["--mean", "0.5,0.5"], "--mean 0.5,0.5: three numbers, one per RGB channel"),
    (["--std", "0.2,0,0.2"], "--std 0.2,0,0.2: three numbers, one per RGB channel (std > 0)"),
])
def test_bad_arguments_fail_fast(demo_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", demo_dir, "--out_dir", str(tmp_path / "o")] + flags)
    assert message in str(e.value)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--weights", "nan"], "--weights nan: finite numbers expected"),
    (["--weights", "demo_ssv2=inf"], "--weights demo_ssv2=inf: finite numbers expected"),
    (["--mixup", "nan"], "--mixup nan: finite numbers expected"),
    (["--lr", "inf"], "--lr inf: a finite number expected"),
    (["--label_smoothing", "nan"], "--label_smoothing nan: a finite number expected"),
    (["--std", "0.2,inf,0.2"], "--std 0.2,inf,0.2: three numbers, one per RGB channel (std > 0)"),
    (["--weights", "0.0004,1,1"], "--weights 0.0004,1,1: demo_kinetics would get no step in --max_steps 1200; "
                                  "raise the weight"),
    # periods of 12 steps: 10 to demo_imagenet, and one each to demo_kinetics (step 3) and demo_ssv2 (step 7)
    (["--weights", "1,1,10", "--max_steps", "4"], "--weights 1,1,10: demo_ssv2 would get no step in --max_steps 4; "
                                                  "give --max_steps 8 or more, or raise the weight"),
    # periods of 5 steps: demo_kinetics at steps 0, 2 and 4, demo_ssv2 at 1, demo_imagenet at 3
    (["--weights", "3,1,1", "--max_steps", "3"], "--weights 3,1,1: demo_imagenet would get no step in --max_steps 3; "
                                                 "give --max_steps 4 or more, or raise the weight"),
    (["--weights", "demo_ssv2=2,demo_ssv2=1"], "--weights demo_ssv2=2,demo_ssv2=1: demo_ssv2 given twice"),
    (["--num_sample", "demo_ssv2=2,demo_ssv2=2"], "--num_sample demo_ssv2=2,demo_ssv2=2: demo_ssv2 given twice"),
])
def test_flags_that_slipped_past_the_checks_are_one_line_before_any_listing(flags, message):
    """Not a number, infinite, a weight that leaves its dataset out of a run of at least one step per dataset
    (the schedule makes weights small integers; a shorter run is a smoke test, whatever the weights), a name
    given twice: one line each, from the flags' check (train.get_args), which runs before anything is listed."""
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert str(e.value) == f"error: {message}"
    for short in (["--max_steps", "2"], ["--max_steps", "2", "--weights", "3,1,1"], ["--max_steps", "1"]):
        assert train.get_args(short).max_steps < 3  # a run shorter than one step per dataset: a smoke test
    assert train.get_args(["--max_steps", "4", "--weights", "3,1,1"]).max_steps == 4


@pytest.mark.parametrize("kind, says", [("truncated", "is cut short"), ("empty", "is empty (0 bytes)"),
                                        ("zip", "is a zip archive, not a PyTorch checkpoint")])
def test_init_that_is_not_a_checkpoint_is_one_line(demo_dir, tmp_path, kind, says):
    path = tmp_path / "vit.pth"
    torch.save(M.TimeSformer(M.make_config("demo"), heads={"a": 3}).state_dict(), path)
    spoil(path, kind)
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path / "o"), "--init", str(path)])
    msg = str(e.value)
    assert msg == f"error: --init {path}: {path} {says}" or msg.startswith(f"error: --init {path}: {path} {says} ")
    assert "\n" not in msg and "weights_only" not in msg


def test_init_by_hub_name_uses_the_weights_normalisation_and_says_so(demo_dir, tmp_path, capsys):
    """--init hf-hub:<org>/<name> in a new process with HF_HOME and HF_HUB_OFFLINE=1, as a user runs it: the
    start-up says the mean and std are the weights' own and where from, and ckpt.pt keeps them; a resume keeps
    the run's; a given --mean that differs from the weights' own is a warning, and is used."""
    pytest.importorskip("huggingface_hub")
    from test_checkpoints import hf_vit

    hf_vit(tmp_path / "vit", classifier=False)  # and Google's preprocessor config: mean = std = 0.5
    hub_cache(tmp_path / "hf" / "hub", "google/vit-tiny", tmp_path / "vit")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    common = FAST + ["--data_dir", demo_dir, "--datasets", "demo_kinetics", "--workers", "0", "--max_steps", "4"]
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "train.py", *common, "--out_dir", str(out), "--stop_at", "1",
                        "--init", "hf-hub:google/vit-tiny"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert ("normalisation: mean 0.5,0.5,0.5, std 0.5,0.5,0.5: the weights' own (hf-hub:google/vit-tiny, "
            "preprocessor_config.json)") in r.stdout
    assert "hf-hub:google/vit-tiny from huggingface_hub's cache" in r.stdout
    assert (load(out / "ckpt.pt")["config"]["mean"], load(out / "ckpt.pt")["config"]["std"]) == ("0.5,0.5,0.5",) * 2
    capsys.readouterr()
    train.main(common + ["--out_dir", str(out), "--stop_at", "2", "--init", "hf-hub:google/vit-tiny"])  # resumes
    assert f"std 0.5,0.5,0.5: the weights' own ({out}/ckpt.pt, the run's)" in capsys.readouterr().out
    assert load(out / "ckpt.pt")["config"]["mean"] == "0.5,0.5,0.5"
    train.main(common + ["--out_dir", str(tmp_path / "o2"), "--stop_at", "0", "--init", str(tmp_path / "vit"),
                         "--mean", "0.45,0.45,0.45"])
    said = capsys.readouterr().out
    assert (f"warning: --mean 0.45,0.45,0.45 differs from the weights' own 0.5,0.5,0.5 ({tmp_path / 'vit'}, "
            "preprocessor_config.json); using --mean") in said
    assert ("normalisation: mean 0.45,0.45,0.45 (--mean), std 0.5,0.5,0.5 (the weights' own "
            f"({tmp_path / 'vit'}, preprocessor_config.json))") in said
    assert load(tmp_path / "o2" / "ckpt.pt")["config"]["mean"] == "0.45,0.45,0.45"


def test_a_hub_name_without_huggingface_hub_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(SystemExit) as e:
        train.main(["--out_dir", str(tmp_path / "o"), "--init", "hf-hub:google/vit-base-patch16-224-in21k"])
    assert str(e.value) == ("error: --init hf-hub:google/vit-base-patch16-224-in21k: a Hub name needs the "
                            "huggingface_hub package: pip install huggingface_hub")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("datasets, recipe", [
    ([], "demo"), (["--datasets", "demo_ssv2"], "demo"), (["--datasets", "demo_kinetics,demo_imagenet"], "demo"),
    (["--datasets", "k400,ssv2,in21k"], "cover"), (["--datasets", "my_own_clips"], "cover"),
    (["--datasets", "k400", "--recipe", "demo"], "demo"),
])
def test_the_named_datasets_pick_the_recipe(datasets, recipe):
    args = train.get_args(datasets)
    assert args.recipe == recipe
    for k, v in recipes.RECIPES[recipe].items():
        assert k in ("datasets", "mean", "std") or getattr(args, k) == v, k
    assert args.mean is args.std is None  # not given: the weights' own, else the recipe's (recipes.normalization)
    assert args.model == ("demo" if recipe == "demo" else "base")


def test_a_mix_of_demo_and_real_sets_must_name_the_recipe():
    with pytest.raises(SystemExit) as e:
        train.get_args(["--datasets", "demo_ssv2,k400"])
    assert "--recipe" in str(e.value) and "\n" not in str(e.value)


def test_a_recipe_sets_any_flag_and_the_command_line_wins(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "demo", {**recipes.RECIPES["demo"], "clip_grad": 0.5, "grad_accum": 2,
                                                  "label_smoothing": 0.1, "log_every": 7})
    args = train.get_args(["--label_smoothing", "0.2"])
    assert (args.clip_grad, args.grad_accum, args.log_every, args.label_smoothing) == (0.5, 2, 7, 0.2)
    assert train.get_args(["--recipe", "cover"]).clip_grad == 1.0  # the flag's own default elsewhere


def test_start_up_report_gives_the_recipe_and_each_datasets_steps_and_epochs(demo_dir, tmp_path, capsys):
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path / "o"), "--max_steps", "8", "--stop_at", "0",
                       "--workers", "0", "--weights", "demo_ssv2=2", "--num_sample", "2"])
    out = capsys.readouterr().out
    assert "recipe demo (recipes.py): " in out and "batch_size=4 (recipe: 32)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  demo_")}
    sizes = {n: len(data.build_dataset(n, demo_dir, "train")) for n in demo.NAMES}
    # 8 steps of weights 1, 2, 1: 2, 4 and 2 steps; batch 4 clips (8 images) from R = 2 clips a video (images
    # 1): epochs = steps x batch / R / size
    for n, steps, batch, R in [("demo_kinetics", 2, 4, 2), ("demo_ssv2", 4, 4, 2), ("demo_imagenet", 2, 8, 1)]:
        assert rows[n][1] == str(sizes[n]) and rows[n][4] == str(batch) and rows[n][5] == str(R)
        assert rows[n][7] == str(steps) and rows[n][8] == f"{steps * batch / R / sizes[n]:.1f}"


def test_help_shows_the_values_of_the_recipe_the_command_would_run(capsys):
    for argv, recipe in [([], "demo"), (["--datasets", "k400,ssv2"], "cover")]:
        with pytest.raises(SystemExit) as e:
            train.get_args(argv + ["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"the defaults shown are the {recipe} recipe's" in " ".join(out.split())
        for flag in ("lr", "batch_size", "max_steps", "optimizer"):  # the first default after the flag's line
            shown = re.search(rf"^  --{flag} \S+.*?\(default:\s+(\S+?)\)", out, re.S | re.M).group(1)
            assert shown == str(recipes.RECIPES[recipe][flag]), flag


@pytest.mark.parametrize("text, expected", [
    ("0.8", {"a": 0.8, "b": 0.8, "c": 0.8}), ("2,1,1", {"a": 2.0, "b": 1.0, "c": 1.0}), ("b=2", {"b": 2.0}),
    ("a=1,c=0.5", {"a": 1.0, "c": 0.5}), ("", {}),
])
def test_every_per_dataset_flag_reads_one_value_one_per_dataset_or_some_by_name(text, expected):
    args = argparse.Namespace(datasets="a,b,c", recipe="demo", mixup=text)
    assert recipes.per_dataset(args, "mixup", float) == expected


@pytest.mark.parametrize("fork", ["loop", "loader"])
def test_a_fork_that_changes_one_side_of_the_schedule_stops_at_the_first_step(demo_dir, tmp_path, monkeypatch,
                                                                              fork):
    """The loop decides which dataset a step trains (data.schedule); the loader's sampler computes the same
    schedule for the batch. A fork that changes one and not the other stops at step 0 with one line."""
    if fork == "loop":  # the loop's schedule shifted by one dataset, the sampler's left as it is
        class ForkedData:
            def __getattr__(self, name):
                return getattr(data, name)

            def schedule(self, step, weights):
                return (data.schedule(step, weights) + 1) % len(weights)

        monkeypatch.setattr(train, "data", ForkedData())
    else:  # the loader handed other weights than the loop's
        build = loaders.build_train_loader
        monkeypatch.setattr(loaders, "build_train_loader", lambda sets, sizes, weights, **kw: build(
            sets, sizes, weights=weights[::-1], **kw))
    with pytest.raises(SystemExit) as e:
        train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path / "o"), "--max_steps", "4",
                           "--workers", "0", "--weights", "2,1,1"])
    message = str(e.value)
    assert message.startswith("error: step 0: the loop trains ") and "\n" not in message
    loop, batch = message.split("trains ")[1].split(", the batch is ")
    assert {loop, batch} <= set(demo.NAMES) and loop != batch
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_checkpoint_of_other_architecture_is_refused(demo_dir, tmp_path):
    out = str(tmp_path / "o")
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "1", "--workers", "0"])
    with pytest.raises(SystemExit, match="different architecture"):
        train.main(FAST + ["--data_dir", demo_dir, "--out_dir", out, "--max_steps", "2", "--workers", "0",
                           "--frames", "4"])


def test_a_resumed_run_keeps_its_normalisation(demo_dir, tmp_path):
    """A run's mean and std are fixed for its life: a resume given others is one line, and the checkpoint keeps
    the run's; given the run's own, it goes on."""
    out, common = str(tmp_path / "o"), FAST + ["--data_dir", demo_dir, "--datasets", "demo_kinetics", "--workers", "0",
                                               "--max_steps", "2", "--stop_at", "1"]
    train.main(common + ["--out_dir", out])
    with pytest.raises(SystemExit) as e:
        train.main(common + ["--out_dir", out, "--stop_at", "2", "--std", "0.5,0.5,0.5"])
    assert str(e.value) == (f"error: --std 0.5,0.5,0.5: the run in {out} trained with --std 0.225,0.225,0.225, "
                            "which it keeps for its life; drop --std or use a new --out_dir")
    assert (load(f"{out}/ckpt.pt")["step"], load(f"{out}/ckpt.pt")["config"]["std"]) == (1, "0.225,0.225,0.225")
    train.main(common + ["--out_dir", out, "--std", "0.225,0.225,0.225"])  # the run's own: at its --stop_at step


def build(argv):
    """train.build_model for a command line, on the CPU, with one head of 4 classes."""
    args = train.get_args(["--datasets", "demo_kinetics"] + argv)
    rt = argparse.Namespace(master=False, device=torch.device("cpu"))
    return args, train.build_model(args, {"demo_kinetics": 4}, None, None, rt)[0]


def test_attention_with_init_is_the_flags_for_a_vit_and_the_weights_own_for_video(tmp_path):
    """--init <a ViT> builds the --attention asked for (divided when not given); --init <video weights> builds their
    own, and an --attention that differs is one line. ckpt.pt's config records what was built."""
    from test_checkpoints import hf_model, hf_vit

    hf_vit(tmp_path / "vit")
    for given in M.ATTENTION_TYPES:
        args, model = build(["--init", str(tmp_path / "vit"), "--attention", given])
        assert model.cfg.attention == args.attention == given
    assert build(["--init", str(tmp_path / "vit")])[1].cfg.attention == "divided_space_time"
    hf_model(tmp_path / "joint", 4, "joint_space_time")
    args, model = build(["--init", str(tmp_path / "joint")])
    assert model.cfg.attention == args.attention == "joint_space_time"
    with pytest.raises(SystemExit) as e:
        build(["--init", str(tmp_path / "joint"), "--attention", "divided_space_time"])
    assert str(e.value) == (f"error: --init {tmp_path / 'joint'}: these huggingface weights have joint_space_time "
                            "attention, not divided_space_time: only image (ViT) weights take the attention asked for")


def test_lr_schedule():
    args = train.get_args(["--lr", "1.0", "--min_lr", "0.1", "--warmup_steps", "4", "--max_steps", "14"])
    lrs = [train.get_lr(s, args) for s in range(15)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and abs(lrs[9] - 0.55) < 1e-12 and abs(lrs[14] - 0.1) < 1e-12
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


class HostReads(TorchFunctionMode):
    """Counts the project's reads of a tensor value into Python: on a GPU each one waits for the device."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            if os.path.dirname(sys._getframe(1).f_code.co_filename) == ROOT:  # a read in our code
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_host_sync_per_step(demo_dir, tmp_path):
    """Outside logging steps a step reads one tensor into Python (the loss, and the stop flag with it)."""
    reads = []
    for steps in (4, 10):
        with HostReads() as counter:
            train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path / str(steps)), "--max_steps", str(steps),
                               "--workers", "1", "--log_every", "100", "--save_every", "100"])
        reads.append(counter.count)
    assert reads[1] - reads[0] == 10 - 4, reads  # set-up, the last step's log and checkpoint cancel out


def test_a_steps_loss_is_read_after_the_next_step_is_queued_and_before_each_save(demo_dir, tmp_path, monkeypatch):
    """The host runs ahead of the GPU: step N's values (loss, SIGTERM flag, clock) are read once step N+1 is
    sent, which is after its forward and backward; a step that logs or saves reads its own at once."""
    events, send, read, save = [], runtime.StepValues.send, runtime.StepValues.read, runtime.CheckpointFiles.save

    def sent(self, step, *args, **kwargs):
        events.append(("send", step))
        send(self, step, *args, **kwargs)

    def got(self, everything=False):
        losses = read(self, everything)
        events.append(("read", [s for s, *_ in losses]))
        return losses

    monkeypatch.setattr(runtime.StepValues, "send", sent)
    monkeypatch.setattr(runtime.StepValues, "read", got)
    monkeypatch.setattr(runtime.CheckpointFiles, "save", lambda self, state: events.append(("save", state["step"]))
                        or save(self, state))
    train.main(FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "7", "--workers", "0",
                       "--log_every", "3", "--save_every", "5"])
    # step s is sent in the iteration after which s + 1 steps are done: logs after 3 and 6, saves after 5 and 7;
    # one read a step, of the step before, and of the step itself too where it logs or saves
    assert events == [("send", 0), ("read", []), ("send", 1), ("read", [0]), ("send", 2), ("read", [1, 2]),
                      ("send", 3), ("read", []), ("send", 4), ("read", [3, 4]), ("save", 5),
                      ("send", 5), ("read", [5]), ("send", 6), ("read", [6]), ("save", 7)]


def test_saving_and_validating_by_the_clock_keep_their_times_over_a_resume(demo_dir, tmp_path, monkeypatch):
    """--save_every 1min, --eval_every 0.5min, each step 10 s of a clock the test drives (step s sends 10 (s + 1)):
    a step's decisions read the clock of the values read before it, the step before's (a step late), so saves
    follow the clock's passing 60, 120, 180 s a step later, at steps 7, 13, 19; validation 30, 60, ... at steps
    4, 7, ... A run stopped at step 8 and resumed in a process whose clock starts elsewhere continues the run's
    clock from its checkpoint: the same steps save and validate."""
    now = [0.0]
    monkeypatch.setattr(runtime, "clock", lambda: now[0])

    class TenSecondSteps:  # data.schedule, each step 10 s later than the one before
        def __getattr__(self, name):
            return getattr(data, name)

        def schedule(self, step, weights):
            now[0] += 10.0
            return data.schedule(step, weights)

    monkeypatch.setattr(train, "data", TenSecondSteps())
    saves, save = {}, runtime.CheckpointFiles.save
    monkeypatch.setattr(runtime.CheckpointFiles, "save", lambda self, state: saves.setdefault(
        os.path.basename(os.path.dirname(self.path)), []).append(state["step"]) or save(self, state))
    common = FAST + ["--data_dir", demo_dir, "--max_steps", "20", "--workers", "0", "--save_every", "1min",
                     "--eval_every", "0.5min", "--val_samples", "2"]
    train.main(common + ["--out_dir", str(tmp_path / "straight")])
    train.main(common + ["--out_dir", str(tmp_path / "resumed"), "--stop_at", "8"])
    now[0] = 1000.0  # a new process: another clock
    train.main(common + ["--out_dir", str(tmp_path / "resumed")])
    assert saves == {"straight": [7, 13, 19, 20], "resumed": [7, 8, 13, 19, 20]}  # 8: --stop_at
    for run in ("straight", "resumed"):
        validated = [r["step"] for r in map(json.loads, open(tmp_path / run / "log.jsonl")) if "val" in r]
        assert validated == [4, 7, 10, 13, 16, 19], run  # not at the last step: the final test is there
        assert load(tmp_path / run / "ckpt.pt")["clock"] == 200.0


def test_periodic_validation_reads_the_same_evenly_spaced_samples_also_after_a_resume(demo_dir, tmp_path,
                                                                                      monkeypatch):
    """--val_samples 5 of each 18-clip validation set: indices i * 18 // 5 = 0, 3, 7, 10, 14, every time, in a
    resumed run too; the final multi-view test reads all of them."""
    reads, build = [], loaders.build_eval_loader
    monkeypatch.setattr(loaders, "build_eval_loader", lambda dataset, indices=None, **kw: reads.append(
        (dataset.spec.name, list(indices))) or build(dataset, indices=indices, **kw))
    common = FAST + ["--data_dir", demo_dir, "--out_dir", str(tmp_path), "--max_steps", "6", "--workers", "0",
                     "--eval_every", "2", "--val_samples", "5"]
    train.main(common + ["--stop_at", "3"])
    train.main(common + ["--final_eval", "multiview"])
    assert reads == ([(n, [0, 3, 7, 10, 14]) for _ in (2, 4) for n in demo.NAMES]  # steps 2 and 4 (resumed)
                     + [(n, list(range(18))) for n in demo.NAMES])  # the final test
    vals = [r["val"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "val" in r]
    assert [v[n]["clips"] for v in vals for n in demo.NAMES] == [5] * 6


@pytest.mark.parametrize("text, value", [
    ("1000", 1000), ("0", 0), ("15min", "15min"), ("0.5min", "0.5min"), ("15m", None), ("-1", None), ("min", None),
    ("0min", 0), ("-0min", 0),  # never, as 0 steps is
    ("15.0000001min", "15.0000001min"), ("15.0min", "15min"), ("1e3min", "1000min"),  # the number typed, exact
    ("1e400min", None), ("1e307min", None), ("infmin", None), ("nanmin", None),  # a period that would never end
    ("1e-400min", None), ("-5min", None), ("1e3", None)])  # 0 seconds; negative; steps are whole numbers
def test_save_and_eval_cadence_is_steps_or_minutes(text, value):
    """Steps are a whole number, minutes any number, kept exactly (a rounded one would save at other times), and
    refused in one line where its period in seconds would be 0, infinite or not a number."""
    if value is None:
        with pytest.raises(argparse.ArgumentTypeError, match="steps .* or of minutes"):
            recipes.cadence(text)
    else:
        assert recipes.cadence(text) == value
    assert isinstance(recipes.RECIPES["demo"]["save_every"], int) and recipes.RECIPES["cover"]["save_every"] == "15min"
