"""model.py against a peer implementation (Hugging Face transformers), a hand-written reference ViT with
plain softmax attention, and hand-computed counts."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import model as M

torch.set_num_threads(2)


def reference_attention(q, k, v):
    """Softmax attention written out, to check the SDPA path against."""
    w = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return w.softmax(dim=-1) @ v


def reference_vit(sd, x, heads, eps=1e-6):
    """A plain ViT forward on images (B, C, H, W) from a timm-layout state dict, no shared code."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]
    ln = lambda z, pre: F.layer_norm(z, z.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps)  # noqa: E731
    lin = lambda z, pre: F.linear(z, sd[pre + ".weight"], sd[pre + ".bias"])  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        B, L, D = t.shape
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = reference_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        t = t + lin(a, b + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return lin(ln(t, "norm")[:, 0], "head")


def small_cfg(**kw):
    return M.TimeSformerConfig(**{**dict(img_size=32, patch_size=8, frames=4, width=48, depth=2, num_heads=3,
                                         drop_path=0.0), **kw})


def timm_state_dict(cfg, classes=10, seed=0):
    """Random ViT weights in timm's key layout (the temporal parts and time_embed left out)."""
    torch.manual_seed(seed)
    m = M.TimeSformer(cfg, heads={"x": classes})
    sd = {k: v.clone() for k, v in m.state_dict().items()
          if "temporal" not in k and k != "time_embed" and not k.startswith("heads.")}
    for k in sd:
        if k.endswith(".bias") or "norm" in k:
            sd[k] += 0.1 * torch.randn_like(sd[k])  # non-trivial norms and biases
    sd["head.weight"], sd["head.bias"] = torch.randn(classes, cfg.width) * 0.1, torch.randn(classes)
    return sd


def randomize_(model, seed=0):
    """Every parameter random, including temporal_fc and time_embed (zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# ---------------------------------------------------------------------------------------------------
# Equivalence with Hugging Face transformers


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
    ours = M.from_pretrained(tmp_path, verbose=False).eval()
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
    ours = M.from_pretrained(tmp_path, verbose=False).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x.transpose(1, 2)).logits).abs().max() < 1e-4
    eight = M.from_pretrained(tmp_path, frames=8, verbose=False)
    assert eight.time_embed.shape[1] == 8
    assert any("resized time_embed" in r for r in eight.load_report)
    # nearest resize of 4 -> 8 repeats each row twice
    assert torch.equal(eight.time_embed[0, ::2], ours.time_embed[0]) and torch.equal(eight.time_embed[0, 1::2], ours.time_embed[0])


# ---------------------------------------------------------------------------------------------------
# Images, the reference ViT, and SDPA


def test_sdpa_matches_reference_attention():
    att = M.Attention(48, 3, True)
    x = torch.randn(5, 17, 48)
    q, k, v = att.qkv(x).reshape(5, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    ref = att.proj(reference_attention(q, k, v).transpose(1, 2).reshape(5, 17, 48))
    assert torch.allclose(att(x), ref, atol=1e-5)


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
    m = M.from_pretrained(src, num_heads=3, verbose=False).eval()  # width 48 is no standard ViT: say the heads
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


def test_space_only_is_per_frame_vit_averaged():
    cfg = small_cfg(attention="space_only")
    m = randomize_(M.TimeSformer(cfg, heads={"x": 10})).eval()
    sd = {k: v for k, v in m.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = sd.pop("heads.x.weight"), sd.pop("heads.x.bias")
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        assert (m(x[:, :, :1]) - reference_vit(sd, x[:, :, 0], heads=3)).abs().max() < 1e-4
        assert not torch.allclose(m(x), m(x[:, :, :1]), atol=1e-3)  # other frames count


def test_any_frames_and_sizes():
    m = M.TimeSformer(small_cfg(), heads={"a": 5}).eval()
    for shape in [(2, 3, 1, 32, 32), (2, 3, 4, 32, 32), (1, 3, 7, 48, 32), (1, 3, 2, 16, 64)]:
        assert m(torch.randn(shape)).shape == (shape[0], 5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 4, 30, 32))


def test_pos_embed_resize_identity_and_2d():
    pos = torch.randn(1, 1 + 16, 8)
    assert M.resize_pos_embed(pos, (4, 4)) is pos
    # a field that depends on the row only must stay row-only after resizing on the 2-D grid
    rows = torch.arange(4.0).repeat_interleave(4)  # (h w) order: row-major
    pos = torch.cat([torch.zeros(1, 1, 8), rows.view(1, 16, 1).expand(1, 16, 8)], dim=1)
    new = M.resize_pos_embed(pos, (6, 5))[0, 1:, 0].view(6, 5)
    assert torch.allclose(new, new[:, :1].expand(6, 5), atol=1e-6)
    assert (new[1:, 0] >= new[:-1, 0]).all()  # still increasing down the rows


def test_zero_init_temporal_branch():
    m = M.TimeSformer(small_cfg(), heads={"a": 5})
    assert m.time_embed.abs().sum() == 0
    for blk in m.blocks:
        assert blk.temporal_fc.weight.abs().sum() == 0 and blk.temporal_fc.bias.abs().sum() == 0


def test_zero_time_embed_leaves_the_model_blind_to_frame_order():
    """Why the demo preset sets time_embed_std: with time_embed at zero (the official init) a clip and the
    same clip reversed give the same logits, also with a trained (non-zero) temporal branch; with a random
    time_embed they do not. Left/right motion labels need the difference."""
    x = torch.randn(2, 3, 4, 32, 32)
    for std, blind in [(0.0, True), (0.5, False)]:
        torch.manual_seed(0)
        m = M.TimeSformer(small_cfg(time_embed_std=std, drop_path=0.0), heads={"a": 5}).eval()
        for blk in m.blocks:
            torch.nn.init.normal_(blk.temporal_fc.weight, std=0.1)
        assert (m.time_embed.std().item() > 0.3) == (not blind)
        with torch.no_grad():
            assert torch.allclose(m(x), m(x.flip(2)), atol=1e-5) == blind


# ---------------------------------------------------------------------------------------------------
# Heads, parameter groups, counts


def test_head_isolation_with_adamw():
    m = M.TimeSformer(small_cfg(drop_path=0.1), heads={"a": 5, "b": 7})
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for _ in range(3):
        loss = F.cross_entropy(m(torch.randn(2, 3, 4, 32, 32), head="a"), torch.tensor([0, 1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = m.state_dict()
    assert torch.equal(after["heads.b.weight"], before["heads.b.weight"])
    assert torch.equal(after["heads.b.bias"], before["heads.b.bias"])
    assert not torch.equal(after["heads.a.weight"], before["heads.a.weight"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="say which one"):
        m(torch.randn(1, 3, 4, 32, 32))


def test_param_groups_cover_every_parameter_once():
    m = M.TimeSformer(small_cfg(), heads={"a": 5, "b": 7})
    decay, no_decay = m.param_groups(0.05)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "time_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "heads.a.bias", "patch_embed.proj.bias"} <= nd
    assert all(n.endswith("bias") or "norm" in n or n in ("cls_token", "pos_embed", "time_embed") for n in nd)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_vit_base_parameter_and_flop_counts():
    with torch.device("meta"):
        m = M.TimeSformer(M.make_config("base"), heads={"k400": 400})
        joint = M.TimeSformer(M.make_config("base", attention="joint_space_time"), heads={"k400": 400})
    assert sum(p.numel() for p in m.parameters()) == 121_566_352
    assert 86.0e6 < sum(p.numel() for p in joint.parameters()) < 86.2e6
    assert 195e9 < m.flops(frames=8, img_size=224, head="k400") < 197e9  # 0.59 TFLOPs / 3 views


@pytest.mark.parametrize("attention", M.ATTENTION_TYPES)
def test_flops_match_torch_flop_counter(monkeypatch, attention):
    from torch.utils.flop_counter import FlopCounterMode

    m = M.TimeSformer(small_cfg(attention=attention), heads={"a": 5}).eval()
    # the counter does not see CPU SDPA kernels: count the same attention written with matmuls
    monkeypatch.setattr(F, "scaled_dot_product_attention", reference_attention)
    for T, H, W in [(4, 32, 32), (1, 32, 32), (3, 32, 48)]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(torch.randn(1, 3, T, H, W))
        assert counter.get_total_flops() == 2 * m.flops(frames=T, img_size=(H, W), head="a")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = randomize_(M.TimeSformer(small_cfg(), heads={"a": 5}))
    x = torch.randn(2, 3, 4, 32, 32)
    grads = []
    for ckpt in (False, True):
        m.grad_checkpointing = ckpt
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------------------
# Checkpoint formats


def official_state(cfg, classes=400, seed=0):
    m = randomize_(M.TimeSformer(cfg, heads={"x": classes}), seed)
    sd = {("model." + k).replace("heads.x.", "head."): v for k, v in m.state_dict().items()}
    return {"model_state": sd, "cur_epoch": 15}, m


@pytest.mark.parametrize("frames", [8, 16, 96])
def test_official_pyth(tmp_path, frames):
    cfg = small_cfg(frames=frames)
    ckpt, ref = official_state(cfg)
    torch.save(ckpt, tmp_path / "TimeSformer_divST_K400.pyth")
    m = M.from_pretrained(tmp_path / "TimeSformer_divST_K400.pyth", num_heads=3, verbose=False).eval()
    assert m.cfg.frames == frames and m.heads["default"].out_features == 400
    x = torch.randn(1, 3, frames, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), ref.eval()(x, head="x"))
    # fine-tune setting: new heads, classifier reported as dropped, time_embed resized for 8 frames
    m8 = M.from_pretrained(tmp_path / "TimeSformer_divST_K400.pyth", heads={"ssv2": 174}, frames=8, num_heads=3,
                           verbose=False)
    assert list(m8.heads) == ["ssv2"] and m8.time_embed.shape[1] == 8
    assert any("dropped classifier" in r for r in m8.load_report)


def test_own_checkpoint_roundtrip(tmp_path):
    from dataclasses import asdict

    m = randomize_(M.TimeSformer(small_cfg(), heads={"k400": 5, "ssv2": 7}))
    torch.save({"model": m.state_dict(), "model_config": asdict(m.cfg), "label_maps": {"k400": list("abcde")},
                "step": 3}, tmp_path / "ckpt.pt")
    back = M.from_pretrained(tmp_path / "ckpt.pt", verbose=False)
    assert back.label_maps == {"k400": list("abcde")}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    keep = M.from_pretrained(tmp_path / "ckpt.pt", heads={"k400": 5, "in1k": 3}, verbose=False)
    assert torch.equal(keep.heads["k400"].weight, m.heads["k400"].weight)  # same name and size: kept
    assert any("'ssv2'" in r for r in keep.load_report)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        M.from_pretrained({"foo.weight": torch.zeros(3)})
    sd = timm_state_dict(small_cfg())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 48)
    with pytest.raises(ValueError, match="shape mismatch for blocks.0.attn.qkv.weight"):
        M.from_pretrained(sd, num_heads=3, verbose=False)
    sd = timm_state_dict(small_cfg())
    sd["fc_norm.weight"] = torch.zeros(48)
    with pytest.raises(ValueError, match="fc_norm.weight"):
        M.from_pretrained(sd, num_heads=3, verbose=False)
    sd = timm_state_dict(small_cfg(width=40, num_heads=4))
    with pytest.raises(ValueError, match="num_heads=..."):
        M.from_pretrained(sd, verbose=False)
    assert M.from_pretrained(sd, num_heads=4, verbose=False).cfg.num_heads == 4
    with pytest.raises(FileNotFoundError):
        M.from_pretrained(tmp_path / "nope.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_cannot_run_code(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"cls_token": _Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        M.from_pretrained(tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out


def test_safetensors_reader_matches_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.randn(2, 2).half(), "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}
    safetensors.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    mine = M._read_safetensors(tmp_path / "t.safetensors")
    assert set(mine) == set(tensors)
    for k, v in tensors.items():
        assert mine[k].dtype == v.dtype and torch.equal(mine[k], v)
