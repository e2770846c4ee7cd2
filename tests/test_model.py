"""model.py against a plain ViT and softmax attention written out (helpers.py), PyTorch's FLOP counter,
and hand-computed counts."""

import pytest
import torch
import torch.nn.functional as F

import model as M
import runtime
from helpers import conv_layout, randomize_, reference_attention, reference_vit, small_cfg

torch.set_num_threads(2)


def test_sdpa_matches_reference_attention():
    att = M.Attention(48, 3, True)
    x = torch.randn(5, 17, 48)
    q, k, v = att.qkv(x).reshape(5, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
    ref = att.proj(reference_attention(q, k, v).transpose(1, 2).reshape(5, 17, 48))
    assert torch.allclose(att(x), ref, atol=1e-5)


def test_one_key_skips_sdpa_with_the_same_values_and_gradients(monkeypatch):
    """Temporal attention on an image (T = 1) is v itself: no SDPA call (whose CUDA flash kernel fails
    beyond 65,535 sequences), the same output and gradients as the softmax over one key."""
    att = M.Attention(48, 3, True)
    x = torch.randn(7, 1, 48, requires_grad=True)
    q, k, v = att.qkv(x).reshape(7, 1, 3, 3, 16).permute(2, 0, 3, 1, 4)
    ref = att.proj(reference_attention(q, k, v).transpose(1, 2).reshape(7, 1, 48))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, att.qkv.weight])
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: calls.append(1))
    out = att(x)
    assert not calls
    assert torch.allclose(out, ref, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), [x, att.qkv.weight])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))


def test_attention_over_many_sequences_is_split_into_calls_the_kernel_takes(monkeypatch):
    monkeypatch.setattr(M, "SDPA_MAX_BATCH", 4)
    sizes = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: sizes.append(len(q)) or real(q, k, v))
    q, k, v = torch.randn(3, 10, 2, 5, 8).unbind(0)  # 10 sequences, 2 heads, 5 tokens
    out = M.attention(q, k, v)
    assert sizes == [4, 4, 2]
    assert torch.allclose(out, reference_attention(q, k, v), atol=1e-6)


def test_patch_embedding_is_the_official_convolution():
    m = M.TimeSformer(small_cfg(), heads={"a": 5})
    x = torch.randn(2, 3, 4, 32, 32)
    weight = conv_layout(m.state_dict(), m.cfg)["patch_embed.proj.weight"]
    conv = F.conv2d(x.transpose(1, 2).flatten(0, 1), weight, m.patch_embed.proj.bias, stride=8)  # (B*T, D, 4, 4)
    expected = conv.flatten(2).transpose(1, 2).reshape(2, 4, 16, 48)  # (B, T, N, D), patches row-major
    assert torch.allclose(m.patch_embed(x), expected, atol=1e-5)


def test_space_only_is_per_frame_vit_averaged():
    cfg = small_cfg(attention="space_only")
    m = randomize_(M.TimeSformer(cfg, heads={"x": 10})).eval()
    sd = conv_layout(m.state_dict(), cfg)
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


def test_layer_decay_scales_each_layer_as_the_formula_says():
    """depth 2, decay 0.5: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm and heads 1 (as BEiT and
    VideoMAE count layers); weight decay grouped as without layer decay."""
    m = M.TimeSformer(small_cfg(depth=2), heads={"a": 5, "b": 7})
    groups = m.param_groups(0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n, p in m.named_parameters() if any(p is q for q in g["params"])}
    decayed = {n for g in groups if g["weight_decay"] for n, p in m.named_parameters()
               if any(p is q for q in g["params"])}
    assert len(scale) == len(list(m.parameters())) == sum(len(g["params"]) for g in groups)
    for name in ["cls_token", "pos_embed", "time_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]:
        assert scale[name] == 0.5 ** 3, name
    for name, s in scale.items():
        if name.startswith("blocks."):
            assert s == 0.5 ** (2 - int(name.split(".")[1])), name
        elif name.startswith(("norm.", "heads.")):
            assert s == 1.0, name
    plain_decay, _ = m.param_groups(0.05)
    assert decayed == {n for n, p in m.named_parameters() if any(p is q for q in plain_decay["params"])}
    assert [g["lr_scale"] for g in m.param_groups(0.05)] == [1.0, 1.0]


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


def test_compiled_trunk_makes_one_graph_per_input_shape_whatever_the_head():
    """Under torch.compile the head's name would be a guard: a graph per head and input shape, and past the
    recompile limit a silent fall-back to eager. With the trunk compiled and the heads outside, the
    graphs are one per input shape, static ones; evaluation, whose batch sizes vary, runs eager; and the
    counts that train.py logs say so."""
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs compiled, runs them as they are
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    whole = M.TimeSformer(small_cfg(), heads={"a": 3, "b": 4, "c": 5})
    trunk = M.TimeSformer(small_cfg(), heads={"a": 3, "b": 4, "c": 5})
    trunk.compile_trunk(backend=backend)
    compiled_whole = torch.compile(whole, backend=backend)
    counts = []
    for model in (trunk, compiled_whole):
        graphs.clear()
        for head in "abc":
            for shape in [(2, 3, 4, 32, 32), (8, 3, 1, 32, 32)]:  # clips and images
                model(torch.randn(shape), head=head).sum().backward()
        counts.append(len(graphs))
    assert counts[0] == 2 and counts[1] > 2, counts
    graphs.clear()
    torch._dynamo.utils.clear_compilation_metrics()  # a bounded queue, which the session's compiles may fill
    before = runtime.compile_counts()["compile"]
    with torch.no_grad():
        for shape in [(3, 3, 4, 32, 32), (5, 3, 1, 32, 32), (1, 3, 4, 32, 32)]:  # eval: other sizes, no graph
            trunk.eval()(torch.randn(shape), head="a")
    assert graphs == []
    trunk.train()(torch.randn(3, 3, 4, 32, 32), head="b").sum().backward()  # a new shape in training
    after = runtime.compile_counts()["compile"]
    assert len(graphs) == 1 and after["graphs"] - before["graphs"] == 1  # static: a graph of its own
    assert after["recompiles"] - before["recompiles"] == 1 and after["graph_breaks"] == before["graph_breaks"]
    torch._dynamo.reset()


def test_a_batch_that_lost_samples_runs_the_plain_trunk_and_compiles_no_graph():
    """Training's full batches (8 clips, 32 images) run compiled, a graph each; batches that lost samples (7 clips
    down to 1, a blank one; 31 images) run the plain trunk and compile nothing: no rank compiles while the others
    wait, and no count of batch sizes reaches dynamo's recompile limit."""
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs compiled, runs them as they are
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch._dynamo.utils.clear_compilation_metrics()
    before = runtime.compile_counts()["compile"]
    model = M.TimeSformer(small_cfg(), heads={"v": 3, "i": 5})
    model.compile_trunk([(8, 3, 4, 32, 32), (32, 3, 1, 32, 32)], backend=backend)
    for B, T in [(8, 4), (32, 1), *((b, 4) for b in range(7, 0, -1)), (31, 1), (8, 4), (32, 1)]:
        model(torch.randn(B, 3, T, 32, 32), head="v" if T > 1 else "i").sum().backward()
    after = runtime.compile_counts()["compile"]
    assert len(graphs) == 2 and after["graphs"] - before["graphs"] == 2, len(graphs)  # clips and images
    assert after["recompiles"] - before["recompiles"] == 1  # the second kind
    torch._dynamo.reset()


# Logits of a seeded small model of each attention type, written down before the attention types were
# separated into their own classes: at init (seeded draws, in their order), then with every weight random,
# in eval and in train mode (drop path seeded) and on an image. A refactoring must keep them.
PINNED_LOGITS = {
    "divided_space_time": [-0.01265003, -0.02528441, 0.00385313, -0.00686096, -0.03099186, 0.04167844, 0.17262229, -0.45625845, 0.42151493, 0.14395446, -0.47179508, 0.44095111, 0.14976123, -0.76046216, 0.16603649, 0.12391298, -0.75795591, 0.15743789, 0.21883956, -0.52591586, 0.40606603, 0.15868199, -0.51058424, 0.48249784],  # noqa: E501
    "joint_space_time": [0.00944580, 0.07659204, -0.11104323, 0.00755551, 0.09001120, -0.11266547, 0.60723722, 0.34371385, -0.23389570, 0.65386760, 0.36670211, -0.19869781, 0.55869830, 0.09543648, -0.27183348, 0.61069679, 0.27567485, -0.41747242, 0.64051652, 0.30687040, -0.24918003, 0.64780569, 0.36209366, -0.15748717],  # noqa: E501
    "space_only": [0.00754966, 0.11278385, -0.06367444, 0.00582208, 0.12899345, -0.06607284, 0.69645822, 0.41783673, 0.95490205, 0.68965697, 0.37935817, 0.95458674, 0.46042305, 0.21311575, 0.78870773, 0.53919744, 0.49811155, 1.01013577, 0.69985574, 0.39903402, 0.91709363, 0.69015771, 0.36731961, 0.94136751],  # noqa: E501
}


@pytest.mark.parametrize("attention", list(PINNED_LOGITS))
def test_each_attention_type_gives_its_pinned_logits(attention):
    torch.manual_seed(0)
    m = M.TimeSformer(small_cfg(attention=attention, drop_path=0.5, time_embed_std=0.5), heads={"a": 3})
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        init = m.eval()(x)
        randomize_(m, seed=3)
        live = m(x)
        torch.manual_seed(2)
        dropped = m.train()(x)
        image = m.eval()(x[:, :, :1])
    got = torch.stack([init, live, dropped, image]).flatten()
    assert torch.allclose(got, torch.tensor(PINNED_LOGITS[attention]), rtol=0, atol=1e-6), got.tolist()


def test_state_dict_keys_in_their_order():
    """Checkpoints, the key maps of checkpoints.py and the optimizer's state (by parameter order) use them."""
    vit = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    temporal = ["temporal_norm1", "temporal_attn.qkv", "temporal_attn.proj", "temporal_fc"]
    for attention, top, block in [("divided_space_time", ["time_embed"], vit + temporal),
                                  ("joint_space_time", ["time_embed"], vit), ("space_only", [], vit)]:
        m = M.TimeSformer(small_cfg(attention=attention, depth=1), heads={"a": 3})
        expected = (["cls_token", "pos_embed"] + top + ["patch_embed.proj.weight", "patch_embed.proj.bias"]
                    + [f"blocks.0.{b}.{w}" for b in block for w in ("weight", "bias")]
                    + ["norm.weight", "norm.bias", "heads.a.weight", "heads.a.bias"])
        assert list(m.state_dict()) == expected, attention


# Multiply-adds as the hand-written formulas counted them, before the count came from PyTorch's FLOP
# counter: ViT-B with a 400-class head at 8x224, without a head at 1x224 and at 16x224x320.
PINNED_FLOPS = {"divided_space_time": (195_830_280_192, 24_499_390_464, 566_811_721_728),
                "joint_space_time": (179_562_805_248, 17_563_060_224, 753_337_387_008),
                "space_only": (140_504_788_992, 17_563_060_224, 407_795_171_328)}


@pytest.mark.parametrize("attention", list(PINNED_FLOPS))
def test_flops_are_the_pinned_counts(attention):
    with torch.device("meta"):
        m = M.TimeSformer(M.make_config("base", attention=attention), heads={"k400": 400})
    got = (m.flops(8, 224, head="k400"), m.flops(1, 224), m.flops(16, (224, 320)))
    assert got == PINNED_FLOPS[attention]
