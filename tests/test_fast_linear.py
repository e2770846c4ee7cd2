"""model.linear's bf16 CPU path (_FastLayoutLinear) against F.linear under autocast: same values and
gradients up to bf16 rounding, in a whole model, with gradient checkpointing and under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import model as M

torch.set_num_threads(2)


def grads(m, x, fast, monkeypatch, ckpt=False):
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", fast)
    m.zero_grad(set_to_none=True)
    m.grad_checkpointing = ckpt
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    out.float().square().sum().backward()
    return out.float(), [p.grad.clone() for p in m.parameters()]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("gelu", [False, True])
def test_linear_matches_f_linear_values_and_grads(monkeypatch, gelu):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, requires_grad=True)
    w = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    g = torch.randn(3, 5, 40).bfloat16()  # the gradient arriving from above
    res = {}
    for fast in (False, True):
        monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", fast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = M.linear(x, w, b, gelu=gelu)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 40)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_outputs=g)
        assert gx.dtype == gw.dtype == gb.dtype == torch.float32
        res[fast] = (y.float(), gx, gw, gb)
    for a, b_ in zip(res[True], res[False]):
        assert rel(a, b_) < 1e-2
    # without autocast and in fp32, it is F.linear exactly
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", True)
    assert torch.equal(M.linear(x, w, b, gelu=gelu), F.linear(F.gelu(x) if gelu else x, w, b))


@pytest.mark.parametrize("ckpt", [False, True])
def test_model_grads_match_plain_autocast(monkeypatch, ckpt):
    torch.manual_seed(0)
    cfg = M.TimeSformerConfig(img_size=32, patch_size=8, frames=4, width=48, depth=2, num_heads=3, drop_path=0.0)
    m = M.TimeSformer(cfg, heads={"a": 5})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # temporal_fc and time_embed non-zero
    x = torch.randn(2, 3, 4, 32, 32)
    out_ref, g_ref = grads(m, x, False, monkeypatch)
    out, g = grads(m, x, True, monkeypatch, ckpt)
    assert rel(out, out_ref) < 2e-2
    assert all(rel(a, b) < 5e-2 for a, b in zip(g, g_ref))


def test_compiles(monkeypatch):
    monkeypatch.setattr(M, "_LAYOUT_BOUND_BF16", True)
    cfg = M.TimeSformerConfig(img_size=32, patch_size=8, frames=2, width=48, depth=1, num_heads=3)
    m = M.TimeSformer(cfg, heads={"a": 5})
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m.eval()(x)
        out = torch.compile(m)(x)
    assert (out.float() - ref.float()).abs().max() < 5e-2
