"""checkpoints.py and TimeSformer.from_pretrained: Hugging Face transformers' Timesformer as the peer
implementation, a plain ViT written out for timm weights, and the official and our own layouts."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

import checkpoints
import model as M
from helpers import conv_layout, hub_cache, randomize_, reference_vit, small_cfg, spoil, timm_state_dict

torch.set_num_threads(2)
load = M.TimeSformer.from_pretrained
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_model(tmp_path, frames, attention, bin_file=False, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=frames, hidden_size=48,
                                         num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                                         attention_type=attention, num_labels=7)
    hf = randomize_(transformers.TimesformerForVideoClassification(cfg), seed).eval()
    hf.save_pretrained(tmp_path)
    if bin_file:  # what older transformers versions wrote by default
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    return hf


@pytest.mark.parametrize("frames", [8, 3])
@pytest.mark.parametrize("attention", ["divided_space_time", "joint_space_time"])
def test_matches_huggingface(tmp_path, frames, attention):
    hf = hf_model(tmp_path, frames, attention)
    ours = load(tmp_path, verbose=False).eval()
    assert ours.cfg.frames == frames and ours.cfg.attention == attention and ours.cfg.num_heads == 3
    assert any(p.abs().sum() > 0 for n, p in hf.named_parameters() if "temporal_dense" in n or "time_emb" in n)
    x = torch.randn(2, 3, frames, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=x.transpose(1, 2)).logits  # they take (B, T, C, H, W)
        mine = ours(x)
    assert (mine - theirs).abs().max() < 1e-4


def test_huggingface_pytorch_bin_and_model_frames(tmp_path):
    """A pytorch_model.bin folder loads too; asked for 8 frames, a 4-frame model resizes time_embed."""
    hf = hf_model(tmp_path, 4, "divided_space_time", bin_file=True)
    ours = load(tmp_path, verbose=False).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x.transpose(1, 2)).logits).abs().max() < 1e-4
    eight = load(tmp_path, frames=8, verbose=False)
    assert eight.time_embed.shape[1] == 8
    assert any("resized time_embed" in r for r in eight.load_report)
    # nearest resize of 4 -> 8 repeats each row twice
    assert torch.equal(eight.time_embed[0, ::2], ours.time_embed[0]) and torch.equal(eight.time_embed[0, 1::2], ours.time_embed[0])


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "memory"])
def test_vit_init_reproduces_vit_on_images(tmp_path, fmt):
    cfg = small_cfg()
    sd = timm_state_dict(cfg)
    src = sd
    if fmt == "pth":
        torch.save(sd, tmp_path / "vit.pth")
        src = tmp_path / "vit.pth"
    elif fmt == "safetensors":
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(sd, str(tmp_path / "vit.safetensors"))
        src = tmp_path / "vit.safetensors"
    m = load(src, num_heads=3, verbose=False).eval()  # width 48 is no standard ViT: say the heads
    assert m.cfg.attention == "divided_space_time" and list(m.heads) == ["default"]
    for blk in m.blocks:  # temporal parts copied from the spatial ones, temporal_fc zero
        assert torch.equal(blk.temporal_attn.qkv.weight, blk.attn.qkv.weight)
        assert torch.equal(blk.temporal_norm1.weight, blk.norm1.weight)
        assert blk.temporal_fc.weight.abs().sum() == 0 and blk.temporal_fc.bias.abs().sum() == 0
    img = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference_vit(sd, img, heads=3)
        assert (m(img.unsqueeze(2)) - expected).abs().max() < 1e-4  # T = 1
        # a video of one repeated frame is the same image to the zero-initialised temporal branch
        assert (m(img.unsqueeze(2).expand(-1, -1, 4, -1, -1)) - expected).abs().max() < 1e-4


def official_state(cfg, classes=400, seed=0):
    m = randomize_(M.TimeSformer(cfg, heads={"x": classes}), seed)
    sd = {("model." + k).replace("heads.x.", "head."): v for k, v in conv_layout(m.state_dict(), cfg).items()}
    return {"model_state": sd, "cur_epoch": 15}, m


@pytest.mark.parametrize("frames", [8, 16, 96])
def test_official_pyth(tmp_path, frames):
    cfg = small_cfg(frames=frames)
    ckpt, ref = official_state(cfg)
    torch.save(ckpt, tmp_path / "TimeSformer_divST_K400.pyth")
    m = load(tmp_path / "TimeSformer_divST_K400.pyth", num_heads=3, verbose=False).eval()
    assert m.cfg.frames == frames and m.heads["default"].out_features == 400
    x = torch.randn(1, 3, frames, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), ref.eval()(x, head="x"))
    # fine-tune setting: new heads, classifier reported as dropped, time_embed resized for 8 frames
    m8 = load(tmp_path / "TimeSformer_divST_K400.pyth", heads={"ssv2": 174}, frames=8, num_heads=3,
                           verbose=False)
    assert list(m8.heads) == ["ssv2"] and m8.time_embed.shape[1] == 8
    assert any("dropped classifier" in r for r in m8.load_report)


def test_own_checkpoint_roundtrip(tmp_path):
    from dataclasses import asdict

    m = randomize_(M.TimeSformer(small_cfg(), heads={"k400": 5, "ssv2": 7}))
    torch.save({"model": m.state_dict(), "model_config": asdict(m.cfg), "label_maps": {"k400": list("abcde")},
                "step": 3}, tmp_path / "ckpt.pt")
    back = load(tmp_path / "ckpt.pt", verbose=False)
    assert back.label_maps == {"k400": list("abcde")}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    keep = load(tmp_path / "ckpt.pt", heads={"k400": 5, "in1k": 3}, verbose=False)
    assert torch.equal(keep.heads["k400"].weight, m.heads["k400"].weight)  # same name and size: kept
    assert any("'ssv2'" in r for r in keep.load_report)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load({"foo.weight": torch.zeros(3)})
    sd = timm_state_dict(small_cfg())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 48)
    with pytest.raises(ValueError, match="shape mismatch for blocks.0.attn.qkv.weight"):
        load(sd, num_heads=3, verbose=False)
    sd = timm_state_dict(small_cfg())
    sd["fc_norm.weight"] = torch.zeros(48)
    with pytest.raises(ValueError, match="fc_norm.weight"):
        load(sd, num_heads=3, verbose=False)
    sd = timm_state_dict(small_cfg(width=40, num_heads=4))
    with pytest.raises(ValueError, match="num_heads=..."):
        load(sd, verbose=False)
    assert load(sd, num_heads=4, verbose=False).cfg.num_heads == 4
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("write, says", [
    (lambda obj, f: torch.save(obj, f), "is not a checkpoint that loads safely: it holds Python objects (print)"),
    (lambda obj, f: pickle.dump(obj, f), "is a pickle, not a PyTorch checkpoint"),
])
def test_checkpoint_cannot_run_code(tmp_path, capsys, write, says):
    with open(tmp_path / "evil.pth", "wb") as f:
        write({"cls_token": _Payload()}, f)
    with pytest.raises(ValueError) as e:
        load(tmp_path / "evil.pth")
    assert says in str(e.value) and "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("kind, says", [
    ("truncated", "is cut short"), ("empty", "is empty (0 bytes)"), ("garbage", "is not a PyTorch checkpoint (it begins"),
    ("text", "is not a PyTorch checkpoint (it begins b'# a README"),
    ("note", "is not a PyTorch checkpoint (it begins b'a note"), ("zip", "is a zip archive, not a PyTorch checkpoint"),
    ("folder", "is a folder"), ("missing", "does not exist"),
])
def test_a_file_that_does_not_read_is_one_line_saying_what_it_is(tmp_path, kind, says):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.randn(1000)}, "step": 3}, path)
    if kind == "missing":
        path.unlink()
    else:
        spoil(path, kind)
    with pytest.raises(ValueError) as e:
        checkpoints.read_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} {says}") and "\n" not in msg and "weights_only" not in msg, msg


def test_a_damaged_record_and_a_legacy_pickle_cut_short(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "a.pt")
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[200:260] = b"\xff" * 60  # the archive's index still reads; a record in it does not
    (tmp_path / "a.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is a damaged PyTorch checkpoint"):
        checkpoints.read_file(tmp_path / "a.pt")
    torch.save({"w": torch.randn(1000)}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    assert checkpoints.read_file(tmp_path / "b.pt")["w"].shape == (1000,)  # torch's older format reads
    (tmp_path / "b.pt").write_bytes((tmp_path / "b.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="is cut short .* its pickle ends early"):
        checkpoints.read_file(tmp_path / "b.pt")


def test_safetensors_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(timm_state_dict(small_cfg()), str(tmp_path / "vit.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install safetensors"):
        load(tmp_path / "vit.safetensors", num_heads=3)


def test_load_returns_plain_values_in_our_layout(tmp_path):
    """The converter's contract: our keys, the conv weight flattened, config fields, the classifier as
    heads.default; and it does not need model.py."""
    cfg = small_cfg()
    fmt, sd, config, extra = checkpoints.load(timm_state_dict(cfg, classes=7), {"num_heads": 3})
    assert fmt == "vit" and sd["patch_embed.proj.weight"].shape == (48, 3 * 8 * 8)
    assert sd["heads.default.weight"].shape == (7, 48) and "head.weight" not in sd
    assert config == dict(width=48, depth=2, patch_size=8, in_chans=3, img_size=32, attention="divided_space_time",
                          mlp_ratio=4.0, qkv_bias=True, num_heads=3) and extra == {}
    code = "import sys, checkpoints; assert 'model' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(checkpoints.__file__), check=True)


# ---------------------------------------------------------------------------------------------------
# Transformers' ViT layout, and Hub names (hf-hub:<org>/<name>) through huggingface_hub's cache

GOOGLE_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}


def hf_vit(path, classifier=True, seed=0):
    """A random Transformers ViT as save_pretrained writes it, and the preprocessor config that
    google/vit-base-patch16-224-in21k has beside it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=192, num_labels=7)
    vit = transformers.ViTForImageClassification(cfg) if classifier else transformers.ViTModel(cfg)
    randomize_(vit, seed).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(GOOGLE_PREPROCESSOR))
    return vit


def timm_vit(path):
    """A timm ViT as timm's push_to_hub writes it: config.json with its pretrained_cfg, model.safetensors."""
    safetensors = pytest.importorskip("safetensors.torch")
    path.mkdir()
    safetensors.save_file(timm_state_dict(small_cfg()), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_32.test", "num_classes": 10, "num_features": 48, "global_pool": "token",
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))


def hf_timesformer(path):
    """A Transformers Timesformer and the preprocessor config of facebook/timesformer-base-finetuned-k400."""
    hf_model(path, 4, "divided_space_time")
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VideoMAEImageProcessor", "image_mean": [0.45, 0.45, 0.45],
        "image_std": [0.225, 0.225, 0.225], "size": {"shortest_edge": 32}}))


@pytest.mark.parametrize("classifier", [True, False])
def test_transformers_vit_matches_their_logits(tmp_path, classifier):
    """ViTForImageClassification: our logits are theirs. ViTModel: our feature is their final-normed CLS token;
    its pooler has no place here and the load report says it was dropped. Their separate query, key and value
    become one qkv; their layer norm eps (1e-12) is read; the preprocessor's mean and std come along."""
    hf = hf_vit(tmp_path, classifier)
    ours = load(tmp_path, verbose=False).eval()
    assert (ours.cfg.eps, ours.cfg.num_heads, ours.cfg.attention) == (1e-12, 3, "divided_space_time")
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=img)
        if classifier:
            assert (ours(img.unsqueeze(2)) - theirs.logits).abs().max() < 1e-4
            assert ours.label_maps == {"default": [f"LABEL_{i}" for i in range(7)]}
        else:
            assert (ours.forward_features(img.unsqueeze(2)) - theirs.last_hidden_state[:, 0]).abs().max() < 1e-4
            assert list(ours.heads) == [] and ours.label_maps is None
            assert any(r.startswith("dropped pooler.dense.") for r in ours.load_report)
        # inflated to divided space-time: a video of one repeated frame is that image (temporal_fc is zero)
        video = img.unsqueeze(2).expand(-1, -1, 4, -1, -1)
        assert (ours.forward_features(video) - ours.forward_features(img.unsqueeze(2))).abs().max() < 1e-4
    assert ours.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3,
                                  "from": f"{tmp_path}, preprocessor_config.json"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub offline, its cache in tmp_path/hub: what HF_HOME=<tmp_path> HF_HUB_OFFLINE=1 give a
    new process (tests/test_train.py runs one so)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.mark.parametrize("make, mean, source", [
    (timm_vit, [0.485, 0.456, 0.406], "config.json pretrained_cfg"),
    (hf_vit, [0.5] * 3, "preprocessor_config.json"),
    (hf_timesformer, [0.45] * 3, "preprocessor_config.json"),
])
def test_a_hub_name_loads_as_its_files_with_their_normalisation(tmp_path, hub, make, mean, source):
    make(tmp_path / "files")
    hub_cache(hub, "org/model", tmp_path / "files")
    by_name = load("hf-hub:org/model", num_heads=3, verbose=False).eval()
    by_path = load(tmp_path / "files", num_heads=3, verbose=False).eval()
    x = torch.randn(2, 3, by_path.cfg.frames, 32, 32)
    with torch.no_grad():
        assert torch.equal(by_name(x), by_path(x))
    assert by_name.normalization == {**by_path.normalization, "from": f"hf-hub:org/model, {source}"}
    assert by_name.normalization["mean"] == mean
    assert f"hf-hub:org/model from huggingface_hub's cache, {hub}" in "; ".join(by_name.load_report)


def bert(path):
    """A Transformers model of another architecture: the config.json fields we read, and its weights."""
    safetensors = pytest.importorskip("safetensors.torch")
    path.mkdir()
    safetensors.save_file({"embeddings.word_embeddings.weight": torch.zeros(50, 12)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert",
                                                  "hidden_size": 12, "num_attention_heads": 2}))


def timm_resnet(path):
    safetensors = pytest.importorskip("safetensors.torch")
    path.mkdir()
    safetensors.save_file({"conv1.weight": torch.zeros(8, 3, 7, 7)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "resnet18.a1_in1k", "num_classes": 1000,
                                                  "pretrained_cfg": {"mean": [0.485, 0.456, 0.406]}}))


@pytest.mark.parametrize("case, says", [
    ("not cached", "hf-hub:org/model: not in the Hugging Face cache {hub}, and the Hub cannot be reached "
                   "(HF_HUB_OFFLINE is set): download it where there is internet (hf download org/model)"),
    ("bert", "hf-hub:org/model holds a Transformers bert model (BertModel), not a ViT or a Timesformer"),
    ("timm resnet", "hf-hub:org/model holds timm's resnet18.a1_in1k, not a ViT"),
    ("not an id", "hf-hub:org/a/b: not a Hub model id; say hf-hub:<org>/<name>"),
    ("no huggingface_hub", "hf-hub:org/model: a Hub name needs the huggingface_hub package (pip install "
                           "huggingface_hub)"),
])
def test_a_hub_name_that_does_not_load_is_one_line(tmp_path, hub, monkeypatch, case, says):
    if case in ("bert", "timm resnet"):
        (bert if case == "bert" else timm_resnet)(tmp_path / "files")
        hub_cache(hub, "org/model", tmp_path / "files")
    if case == "no huggingface_hub":
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises((ValueError, ImportError)) as e:
        load("hf-hub:org/a/b" if case == "not an id" else "hf-hub:org/model", verbose=False)
    assert str(e.value).startswith(says.format(hub=hub)) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------------
# What the review of the Hub names and Transformers' layouts found: each a folder as others write it


@pytest.mark.parametrize("pre, mean, std", [
    ({"image_mean": 0.5, "image_std": 0.25}, [0.5] * 3, [0.25] * 3),  # one number for all three channels
    ({"do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, [0.0] * 3, [1.0] * 3),
])
def test_the_normalisation_is_what_transformers_processor_does(tmp_path, pre, mean, std):
    """Transformers' own image processor on an image gives the pixels our model gets from these mean and std."""
    transformers = pytest.importorskip("transformers")
    hf_vit(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "do_resize": False, "do_rescale": True}))
    ours = load(tmp_path, verbose=False).normalization
    assert (ours["mean"], ours["std"]) == (mean, std), ours
    img = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)(img.numpy(), return_tensors="pt").pixel_values
    mine = (img.permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert (theirs[0] - mine).abs().max() < 1e-5


@pytest.mark.parametrize("pre, says", [
    ({"image_mean": [0.5] * 3}, "preprocessor_config.json gives image_mean [0.5, 0.5, 0.5], no image_std"),
    ({"do_normalize": True}, "preprocessor_config.json gives no image_mean, no image_std"),
    ({"image_mean": [0.5] * 3, "image_std": [0.5, 0.5]}, "gives image_mean [0.5, 0.5, 0.5], image_std [0.5, 0.5]"),
    (None, "has no preprocessor_config.json"),
])
def test_a_normalisation_not_known_is_said(tmp_path, pre, says):
    """Only one of mean and std, neither (the processor's class defaults, which the files do not say), or no
    preprocessor config: not the weights' own, and the load report says so."""
    hf_vit(tmp_path)
    if pre is None:
        (tmp_path / "preprocessor_config.json").unlink()
    else:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    ours = load(tmp_path, verbose=False)
    assert ours.normalization is None
    assert any(says in r and r.endswith("their normalisation is not known") for r in ours.load_report), ours.load_report


def test_a_hub_name_with_a_revision_and_timms_older_prefix(tmp_path, hub):
    """hf-hub:<org>/<name>@<revision> (a branch or a commit) reads that revision from the cache, as timm does; timm's
    older hf_hub: prefix reads too; a revision not in the cache is one line naming the download command."""
    hf_vit(tmp_path / "files")
    hub_cache(hub, "org/model", tmp_path / "files")
    commit = (hub / "models--org--model" / "refs" / "main").read_text()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = load(tmp_path / "files", verbose=False).eval()(x)
        for name in ("hf-hub:org/model@main", f"hf-hub:org/model@{commit}", "hf_hub:org/model"):
            assert torch.equal(load(name, verbose=False).eval()(x), expected), name
    with pytest.raises(ValueError) as e:
        load("hf-hub:org/model@v2", verbose=False)
    assert str(e.value).startswith("hf-hub:org/model@v2: not in the Hugging Face cache") and "\n" not in str(e.value)
    assert "(hf download org/model --revision v2)" in str(e.value)


def test_the_download_command_is_the_installed_huggingface_hubs(tmp_path, hub, monkeypatch):
    """`hf download` from huggingface_hub 0.34 (requirements-test.txt's floor), huggingface-cli before."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "__version__", "0.33.4")
    with pytest.raises(ValueError, match=r"\(huggingface-cli download org/model\)"):
        load("hf-hub:org/model", verbose=False)
    floor = re.search(r"^huggingface_hub>=([\d.]+)", open(os.path.join(ROOT, "requirements-test.txt")).read(), re.M)
    assert tuple(int(v) for v in floor[1].split(".")[:2]) >= (0, 34)


@pytest.mark.parametrize("where", ["hub", "folder"])
def test_without_safetensors_both_weights_files_read_the_torch_one(tmp_path, hub, monkeypatch, where):
    """google/vit-base-patch16-224-in21k holds model.safetensors and pytorch_model.bin: without the safetensors
    package (in no requirements file a run needs) the second is read, with weights_only as any torch file."""
    safetensors = pytest.importorskip("safetensors.torch")
    files = tmp_path / "files"
    hf_vit(files)
    torch.save(safetensors.load_file(str(files / "model.safetensors")), files / "pytorch_model.bin")
    hub_cache(hub, "org/model", files)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = load(files, verbose=False).eval()(x)
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if it were not installed
        ours = load("hf-hub:org/model" if where == "hub" else files, verbose=False).eval()
        assert torch.equal(ours(x), expected)
    (files / "pytorch_model.bin").unlink()  # model.safetensors alone: the package is needed
    with pytest.raises(ImportError, match="pip install safetensors"):
        load(files, verbose=False)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_weights_read_all_their_shards(tmp_path, hub, weights):
    """save_pretrained's shards (model-00001-of-00002.safetensors ... and the index naming each tensor's), in a
    folder and by Hub name: the same model as the whole file."""
    safetensors = pytest.importorskip("safetensors.torch")
    hf_vit(tmp_path / "whole")
    sd = safetensors.load_file(str(tmp_path / "whole" / "model.safetensors"))
    folder = tmp_path / "files"
    folder.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        (folder / f).write_text((tmp_path / "whole" / f).read_text())
    stem, ext = os.path.splitext(weights)
    keys, shard = sorted(sd), [f"{stem}-0000{i}-of-00002{ext}" for i in (1, 2)]
    for i, part in enumerate((keys[:20], keys[20:])):
        if ext == ".safetensors":
            safetensors.save_file({k: sd[k] for k in part}, str(folder / shard[i]))
        else:
            torch.save({k: sd[k] for k in part}, folder / shard[i])
    (folder / f"{weights}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: shard[i >= 20] for i, k in enumerate(keys)}}))
    hub_cache(hub, "org/model", folder)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = load(tmp_path / "whole", verbose=False).eval()(x)
        assert torch.equal(load(folder, verbose=False).eval()(x), expected)
        assert torch.equal(load("hf-hub:org/model", verbose=False).eval()(x), expected)


def test_a_transformers_vit_without_qkv_bias(tmp_path):
    """ViTConfig(qkv_bias=False), as timm ViTs without it: our model has no qkv bias, and their features."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=3, intermediate_size=192, qkv_bias=False)
    hf = randomize_(transformers.ViTModel(cfg)).eval()
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path, verbose=False).eval()
    assert ours.cfg.qkv_bias is False and ours.blocks[0].attn.qkv.bias is None
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=img).last_hidden_state[:, 0]
        assert (ours.forward_features(img.unsqueeze(2)) - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["vit", "timesformer"])
def test_a_config_without_layer_norm_eps_takes_transformers_default(tmp_path, kind):
    """config.json files of older Transformers, or written by hand, may leave layer_norm_eps out; Transformers
    then takes its class's default (ViT 1e-12, Timesformer 1e-6), and so do we."""
    transformers = pytest.importorskip("transformers")
    if kind == "vit":
        hf_vit(tmp_path)
    else:
        hf_timesformer(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).layer_norm_eps
    assert load(tmp_path, verbose=False).cfg.eps == theirs == {"vit": 1e-12, "timesformer": 1e-6}[kind]


def one_based_labels(path):
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {str(i + 1): v for i, v in enumerate(config["id2label"].values())}
    (path / "config.json").write_text(json.dumps(config))


def five_labels(path):
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(5)}  # the classifier has 7
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("spoil_it, says", [
    (one_based_labels, "config.json's id2label does not number the classes 0..6: their names are not kept"),
    (five_labels, "5 class names for 7 classes: names not kept"),
])
def test_class_names_that_do_not_fit_the_classifier_are_said_and_dropped(tmp_path, spoil_it, says):
    hf_vit(tmp_path)
    spoil_it(tmp_path)
    ours = load(tmp_path, verbose=False)
    assert ours.label_maps is None and ours.heads["default"].out_features == 7
    assert any(r.endswith(says) for r in ours.load_report), ours.load_report


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_a_config_file_that_is_not_json_is_one_line_naming_it(tmp_path, hub, name):
    hf_vit(tmp_path / "files")
    (tmp_path / "files" / name).write_text((tmp_path / "files" / name).read_text()[:-3])  # cut short
    hub_cache(hub, "org/model", tmp_path / "files")
    with pytest.raises(ValueError) as e:
        load("hf-hub:org/model", verbose=False)
    msg = str(e.value)
    assert re.match(rf"{hub}/models--org--model/snapshots/\w+/{name} does not read as JSON \(", msg) and "\n" not in msg


@pytest.mark.parametrize("src", ["timesformer", "ckpt.pt"])
def test_video_weights_keep_their_attention(tmp_path, src):
    """attention= chooses a ViT's (the test above); video weights were trained with theirs: another is one line."""
    hf_model(tmp_path, 4, "joint_space_time")
    if src == "ckpt.pt":
        from dataclasses import asdict

        m = load(tmp_path, verbose=False)
        torch.save({"model": m.state_dict(), "model_config": asdict(m.cfg), "label_maps": {}}, tmp_path / "ckpt.pt")
    path = tmp_path / "ckpt.pt" if src == "ckpt.pt" else tmp_path
    assert load(path, attention="joint_space_time", verbose=False).cfg.attention == "joint_space_time"
    with pytest.raises(ValueError) as e:
        load(path, attention="divided_space_time", verbose=False)
    fmt = "cover" if src == "ckpt.pt" else "huggingface"
    assert str(e.value) == (f"these {fmt} weights have joint_space_time attention, not divided_space_time: only "
                            "image (ViT) weights take the attention asked for")


def test_a_vit_takes_the_attention_asked_for(tmp_path):
    hf_vit(tmp_path)
    for attention in M.ATTENTION_TYPES:
        ours = load(tmp_path, attention=attention, verbose=False).eval()
        assert ours.cfg.attention == attention
        img = torch.randn(2, 3, 1, 32, 32)
        with torch.no_grad():  # an image is that ViT's image under any attention type
            assert (ours(img) - load(tmp_path, verbose=False).eval()(img)).abs().max() < 1e-4
