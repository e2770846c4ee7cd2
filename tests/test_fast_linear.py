"""model.linear's bf16 CPU path (_CpuBf16Linear, with and without the layout-bound GEMMs) against F.linear
under autocast: same values and gradients up to bf16 rounding, in a whole model, with gradient
checkpointing and under torch.compile; and less saved for backward."""

import pytest
import torch
import torch.nn.functional as F

import model as M

torch.set_num_threads(2)


def plain_linear(x, weight, bias=None, gelu=False):  # what nn.Linear does under autocast
    return F.linear(F.gelu(x) if gelu else x, weight, bias)


def small_model():
    torch.manual_seed(0)
    cfg = M.TimeSformerConfig(img_size=32, patch_size=8, frames=4, width=48, depth=2, num_heads=3, drop_path=0.0)
    m = M.TimeSformer(cfg, heads={"a": 5})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # temporal_fc and time_embed non-zero
    return m, torch.randn(2, 3, 4, 32, 32)


def grads(m, x, ckpt=False):
    m.zero_grad(set_to_none=True)
    m.grad_checkpointing = ckpt
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out.float().square().sum().backward()
    return out.float(), [p.grad.clone() for p in m.parameters()]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("layout_bound", [False, True])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_matches_f_linear_values_and_grads(monkeypatch, gelu, layout_bound):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    g = torch.randn(3, 5, 40).bfloat16()  # the gradient arriving from above
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", layout_bound)
    res = []
    for fn in (M.linear, plain_linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b, gelu=gelu)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 40)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_outputs=g)
        assert gx.dtype == gw.dtype == gb.dtype == torch.float32
        res.append((y.float(), gx, gw, gb))
    for a, b_ in zip(*res):
        assert rel(a, b_) < 1e-2
    # without autocast and in fp32, it is F.linear exactly
    assert torch.equal(M.linear(x, w, b, gelu=gelu), plain_linear(x, w, b, gelu=gelu))


@pytest.mark.parametrize("layout_bound, ckpt", [(False, False), (True, False), (True, True)])
def test_model_grads_match_plain_autocast(monkeypatch, layout_bound, ckpt):
    m, x = small_model()
    with monkeypatch.context() as mp:
        mp.setattr(M, "linear", plain_linear)
        out_ref, g_ref = grads(m, x)
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", layout_bound)
    out, g = grads(m, x, ckpt)
    assert rel(out, out_ref) < 2e-2
    assert all(rel(a, b) < 5e-2 for a, b in zip(g, g_ref))


def saved_bytes(m, x):
    """Bytes autograd keeps for backward in one forward under bf16 autocast: each storage once, the
    parameters themselves not counted (they are held anyway; a bf16 copy of one is counted)."""
    params, seen = {p.untyped_storage().data_ptr() for p in m.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    return sum(seen.values())


def test_saves_less_for_backward_than_autocast(monkeypatch):
    """No GELU output (recomputed) and no bf16 copies of the weights: what made the step peak 0.70x of
    the F.linear version in bench.py --section train."""
    m, x = small_model()
    with monkeypatch.context() as mp:
        mp.setattr(M, "linear", plain_linear)
        plain = saved_bytes(m, x)
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", False)
    assert saved_bytes(m, x) < 0.85 * plain


@pytest.mark.parametrize("layout_bound", [False, True])
def test_compiles(monkeypatch, layout_bound):
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", layout_bound)
    cfg = M.TimeSformerConfig(img_size=32, patch_size=8, frames=2, width=48, depth=1, num_heads=3)
    m = M.TimeSformer(cfg, heads={"a": 5})
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m.eval()(x)
        out = torch.compile(m)(x)
    assert (out.float() - ref.float()).abs().max() < 5e-2
