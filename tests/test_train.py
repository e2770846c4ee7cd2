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
    """compile_trunk wraps forward_features in a function holding the live model; a deepcopy of the model
    would keep that function, and its copy would run the live weights."""
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
    assert torch.equal(trap.forward_features(x), model.forward_features(x))  # the deepcopy's trap


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
                                  "raise the weight or --max_steps"),
    # periods of 12 steps: 10 to demo_imagenet, and one each to demo_kinetics (step 3) and demo_ssv2 (step 7)
    (["--weights", "1,1,10", "--max_steps", "4"], "--weights 1,1,10: demo_ssv2 would get no step in --max_steps 4; "
                                                  "raise the weight or --max_steps"),
    (["--weights", "demo_ssv2=2,demo_ssv2=1"], "--weights demo_ssv2=2,demo_ssv2=1: demo_ssv2 given twice"),
    (["--num_sample", "demo_ssv2=2,demo_ssv2=2"], "--num_sample demo_ssv2=2,demo_ssv2=2: demo_ssv2 given twice"),
])
def test_flags_that_slipped_past_the_checks_are_one_line_before_any_listing(flags, message):
    """Not a number, infinite, a weight so small that its dataset never trains in the run (the schedule makes
    weights small integers), a name given twice: one line each, from the flags' check (train.get_args), which
    runs before anything is listed."""
    with pytest.raises(SystemExit) as e:
        train.get_args(flags)
    assert str(e.value) == f"error: {message}"
    assert train.get_args(["--max_steps", "1"]).max_steps == 1  # a run shorter than one step per dataset is no error


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
