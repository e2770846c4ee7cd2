"""tools/export.py: a head of a run trained a few steps on the demo data, exported and loaded by Transformers'
TimesformerForVideoClassification, gives our logits; id2label names the classes; the preprocessor config
holds the run's normalisation; our --init reads the folder back; what cannot export is one line."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import model as M
import train
import video
from helpers import randomize_, small_cfg
from test_fork import own_videos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/ is a folder of scripts, not a package

import export  # noqa: E402

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def run(demo_dir, tmp_path_factory):
    """ckpt.pt of 4 steps on a demo set (6 classes) and a folder of one's own (2 classes), with a moving average
    of the weights and a normalisation of its own."""
    root = tmp_path_factory.mktemp("export")
    (root / "data").mkdir()
    os.symlink(os.path.join(demo_dir, "demo_kinetics"), root / "data" / "demo_kinetics")
    own_videos(root / "data")
    train.main(["--recipe", "demo", "--datasets", "demo_kinetics,mine", "--data_dir", str(root / "data"),
                "--out_dir", str(root / "out"), "--batch_size", "4", "--max_steps", "4", "--workers", "0",
                "--eval_every", "0", "--final_eval", "none", "--ema", "0.5", "--mean", ",".join(map(str, MEAN)),
                "--std", ",".join(map(str, STD))])
    return root / "out" / "ckpt.pt"


@pytest.mark.parametrize("head", ["demo_kinetics", "mine"])
def test_transformers_gives_our_logits_and_our_init_reads_it_back(run, tmp_path, head):
    transformers = pytest.importorskip("transformers")
    export.main(["--ckpt", str(run), "--head", head, "--out", str(tmp_path / "hf")])
    classes = torch.load(run, weights_only=True)["label_maps"][head]
    assert len(classes) == {"demo_kinetics": 6, "mine": 2}[head]
    ours = M.TimeSformer.from_pretrained(str(run), verbose=False).eval()  # the moving average, as exported
    theirs = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label == dict(enumerate(classes))
    back = M.TimeSformer.from_pretrained(str(tmp_path / "hf"), verbose=False).eval()
    x = torch.randn(3, 3, 8, 32, 32)
    with torch.no_grad():
        mine = ours(x, head=head)
        assert (theirs(pixel_values=x.transpose(1, 2)).logits - mine).abs().max() < 1e-4  # they take (B, T, C, H, W)
        assert torch.equal(back(x), mine)
    assert back.label_maps == {"default": classes}
    assert (back.normalization["mean"], back.normalization["std"]) == (MEAN, STD)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert (list(processor.image_mean), list(processor.image_std)) == (MEAN, STD)


def test_live_exports_the_live_weights_and_a_second_export_replaces_the_first(run, tmp_path, monkeypatch):
    """--live: not the moving average. Without the safetensors package the weights are pytorch_model.bin,
    which Transformers reads; the model.safetensors of the export before is gone, or it would be read first."""
    transformers = pytest.importorskip("transformers")
    export.main(["--ckpt", str(run), "--head", "mine", "--out", str(tmp_path / "hf")])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "safetensors.torch", None)  # as if it were not installed
        export.main(["--ckpt", str(run), "--head", "mine", "--out", str(tmp_path / "hf"), "--live"])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    ckpt = torch.load(run, weights_only=True)
    live = M.TimeSformer(M.TimeSformerConfig(**ckpt["model_config"]), heads={"demo_kinetics": 6, "mine": 2})
    live.load_state_dict(ckpt["model"])
    theirs = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(theirs.classifier.weight, live.heads["mine"].weight)
    assert not torch.equal(theirs.classifier.weight, ckpt["ema"]["heads.mine.weight"])
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert (theirs(pixel_values=x.transpose(1, 2)).logits - live.eval()(x, head="mine")).abs().max() < 1e-4


def run_checkpoint(path, attention="divided_space_time", head="k400", data_dir="data", **cfg):
    """A ckpt.pt as train.py writes it, of a random model with one head."""
    m = randomize_(M.TimeSformer(small_cfg(attention=attention, **cfg), heads={head: 5})).eval()
    torch.save({"model": m.state_dict(), "model_config": dataclasses.asdict(m.cfg), "optimizer": {}, "scaler": {},
                "step": 0, "sampler": {"micro": 0}, "label_maps": {head: list("vwxyz")}, "failed": {},
                "config": {"mean": "0.45,0.45,0.45", "std": "0.225,0.225,0.225", "data_dir": str(data_dir)}}, path)
    return m


@pytest.mark.parametrize("attention", ["divided_space_time", "joint_space_time"])
def test_the_attention_types_transformers_computes_as_we_do_export(tmp_path, attention):
    transformers = pytest.importorskip("transformers")
    m = run_checkpoint(tmp_path / "ckpt.pt", attention)
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])  # its one head
    theirs = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.attention_type == attention and theirs.config.id2label == dict(enumerate("vwxyz"))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (theirs(pixel_values=x.transpose(1, 2)).logits - m(x)).abs().max() < 1e-4


def own_images(data_dir):
    """<data_dir>/pics/{train,val}/<class>/*.png: an image dataset of one's own."""
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (data_dir / "pics" / split / c).mkdir(parents=True)
            Image.fromarray(np.full((40, 48, 3), 100, np.uint8)).save(data_dir / "pics" / split / c / "0.png")


@pytest.mark.parametrize("head", ["in21k", "demo_imagenet", "pics"])
def test_an_image_head_exports_as_a_one_frame_model_with_the_imagenet_test_crop(tmp_path, head):
    """The head of an image dataset (ImageNet-21K, the demo's, a folder of one's own) is tested on 1-frame
    clips: Transformers' model of 1 frame gives our logits on one, and its processor takes the centre crop
    eval.py tests with (short side to img_size*256/224)."""
    transformers = pytest.importorskip("transformers")
    own_images(tmp_path / "data")
    m = run_checkpoint(tmp_path / "ckpt.pt", head=head, data_dir=tmp_path / "data")
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    theirs = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.num_frames == 1
    x = torch.randn(2, 3, 1, 32, 32)
    with torch.no_grad():
        assert (theirs(pixel_values=x.transpose(1, 2)).logits - m(x)).abs().max() < 1e-4
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size["shortest_edge"] == round(32 * 256 / 224) == 37  # 224 -> 256
    assert (processor.crop_size["height"], processor.crop_size["width"]) == (32, 32)
    assert video.eval_image_box(37, 370, 32) == (2.5, 169, 32, 32)  # the same box: short side 37 -> 32 crop


def test_a_head_whose_dataset_is_gone_is_one_line(tmp_path):
    """A folder of one's own that is neither listed beside ckpt.pt nor on disk: videos or images is unknown."""
    run_checkpoint(tmp_path / "ckpt.pt", head="pics", data_dir=tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert str(e.value).startswith("error: cannot tell whether head pics was trained on videos or images: dataset "
                                   "'pics' (train) cannot be read: no folder ") and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_a_model_without_qkv_bias_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = run_checkpoint(tmp_path / "ckpt.pt", qkv_bias=False)
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    theirs = transformers.TimesformerForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.qkv_bias is False and theirs.timesformer.encoder.layer[0].attention.attention.qkv.bias is None
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (theirs(pixel_values=x.transpose(1, 2)).logits - m(x)).abs().max() < 1e-4
        assert torch.equal(M.TimeSformer.from_pretrained(str(tmp_path / "hf"), verbose=False).eval()(x), m(x))


def test_the_key_tables_read_both_ways():
    """Every key of our model, divided or joint, goes to Transformers' name and comes back (a head as 'head')."""
    for attention in export.EXPORTED:
        for key in M.TimeSformer(small_cfg(attention=attention), heads={"k400": 3}).state_dict():
            theirs = export.transformers_key(key)
            assert checkpoints.hf_key(theirs, "timesformer.") == key.replace("heads.k400.", "head."), theirs


@pytest.mark.parametrize("case, says", [
    ("space_only", "error: {ckpt} has space_only attention; Transformers' Timesformer computes divided_space_time "
                   "and joint_space_time as we do, not that"),
    ("two heads", "error: {ckpt} has heads demo_kinetics, mine: say which with --head"),
    ("no such head", "error: {ckpt} has no head 'k400'; it has demo_kinetics, mine"),
    ("not a checkpoint", "error: --ckpt {ckpt} is not a PyTorch checkpoint (it begins"),
    ("out is a file", "error: --out {ckpt} is a file; name a folder"),
])
def test_what_cannot_export_is_one_line(run, tmp_path, case, says):
    ckpt, flags = run, ["--out", str(tmp_path / "hf")]
    if case == "space_only":
        ckpt = tmp_path / "ckpt.pt"
        run_checkpoint(ckpt, "space_only")
    elif case == "no such head":
        flags += ["--head", "k400"]
    elif case == "not a checkpoint":
        ckpt = tmp_path / "notes.txt"
        ckpt.write_text("a note, not a checkpoint\n")
    elif case == "out is a file":
        flags = ["--head", "mine", "--out", str(run)]
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(ckpt)] + flags)
    assert str(e.value).startswith(says.format(ckpt=ckpt)) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "hf").exists()
