"""
A compact TimeSformer (Bertasius et al., ICML 2021) with one classification head per dataset, as CoVeR
(Zhang et al., 2021) co-trains it on several video datasets and on images (single-frame videos).

Input is (B, C, T, H, W), as in the official code. T, H and W are read from the input, so the same model
takes 8-frame clips and images (T = 1). Attention goes through F.scaled_dot_product_attention, which
picks the fused flash / memory-efficient kernels on CUDA. Linear layers go through `linear`: F.linear,
except in bf16 on the CPU, where a custom autograd function saves less for backward and, on CPUs without
a native bf16 GEMM, puts every GEMM in the operand layout that runs fast there (6x a step).

Reading guide: TimeSformerConfig -> Block (the divided space-time attention is in Block.forward)
-> TimeSformer (embeddings, heads, parameter groups, FLOPs) -> from_pretrained (checkpoint formats).
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")


@dataclass
class TimeSformerConfig:
    img_size: int = 224  # the size pos_embed is stored for; other sizes are resized to on the fly
    patch_size: int = 16
    in_chans: int = 3
    frames: int = 8  # the length time_embed is stored for; other T are resized to on the fly
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    attention: str = "divided_space_time"
    drop_path: float = 0.1  # stochastic depth, rising linearly from 0 at the first block to this at the last
    qkv_bias: bool = True
    eps: float = 1e-6
    # 0: time_embed starts at zero, as in the official model, which always starts from image weights.
    # Trained from scratch, a zero time embedding makes the model blind to the order of frames (it is
    # then exactly invariant to reversing the clip), and leaving that point takes hundreds of steps: the
    # demo preset draws it at random instead (see the README's demo section).
    time_embed_std: float = 0.0

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


# ViT widths / depths / heads of the usual sizes; 'demo' is what the CPU demo trains in minutes.
PRESETS = {
    "demo": dict(width=96, depth=4, num_heads=3, patch_size=8, img_size=32, time_embed_std=0.5),
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
}


def make_config(preset="base", **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return TimeSformerConfig(**{**PRESETS[preset], **overrides})


def _bf16_gemm_is_layout_bound():
    """True where PyTorch has no native bf16 GEMM on the CPU (no AVX512-BF16/AMX: AVX2 machines).
    Its fallback kernel there runs ~20x faster when the left operand is column-major and the right
    one row-major, and slows ~3x once its output outgrows the cache (`python bench.py --section mfu`
    prints the speed per layout)."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return True


_LAYOUT_BOUND_BF16 = _bf16_gemm_is_layout_bound()


def _mm(a, b, bias=None, rows=512):
    """bias + a @ b for a (M, K), b (K, N). Where the bf16 GEMM is layout-bound: with a copied column-major
    and b row-major, in blocks of rows."""
    if not _LAYOUT_BOUND_BF16:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    a, b = a.t().contiguous().t(), b.contiguous()
    out = a.new_empty(a.shape[0], b.shape[1])
    for i in range(0, a.shape[0], rows):
        if bias is None:
            torch.mm(a[i : i + rows], b, out=out[i : i + rows])
        else:
            torch.addmm(bias, a[i : i + rows], b, out=out[i : i + rows])
    return out


class _CpuBf16Linear(torch.autograd.Function):
    """act(x) @ weight.T + bias in `dtype` (act: identity, or GELU for the MLP's second layer), for bf16 on
    the CPU. Saved for backward: x in bf16 (not also GELU(x), which is recomputed) and the fp32 weight,
    cast again rather than kept in bf16 as autocast would (a ViT-B 8x224 step peaks at 278 MB instead of
    340 MB with F.linear). Where the GEMM is layout-bound, all three GEMMs (forward, input grad, weight grad)
    run in the layout the fallback kernel runs fast (_mm); the copies cost O(M*K), the GEMMs O(M*N*K)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, gelu):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (M, K)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias, ctx.gelu = x.shape, x.dtype, bias is not None, gelu
        y = _mm(F.gelu(x2) if gelu else x2, weight.to(dtype).t(), None if bias is None else bias.to(dtype))
        return y.view(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).to(x2.dtype)  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(g, weight.to(x2.dtype))  # (M, K)
            dx = torch.ops.aten.gelu_backward(dx, x2) if ctx.gelu else dx
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = g.t() @ (F.gelu(x2) if ctx.gelu else x2)  # (N, K): g.t() is column-major already
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0, dtype=torch.float32)
        return dx, dw, db, None, None


def linear(x, weight, bias=None, gelu=False):
    """F.linear(GELU(x) if gelu else x, weight, bias). In bf16 (autocast or bf16 weights) on the CPU it is
    computed by _CpuBf16Linear, for memory everywhere and for speed on CPUs without a native bf16 GEMM,
    where nn.Linear's input-grad GEMM alone takes ~85% of a ViT-B training step in the slow layout
    (profile: the README's benchmark section). Elsewhere (GPUs) F.linear."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if x.device.type == "cpu" and dtype == torch.bfloat16:
        return (_layout_bound_linear if _LAYOUT_BOUND_BF16 else _CpuBf16Linear.apply)(x, weight, bias, dtype, gelu)
    return F.linear(F.gelu(x) if gelu else x, weight, bias)


@torch.compiler.disable  # kept eager: the layout copies are no-ops by value, and torch.compile drops them (3x slower)
def _layout_bound_linear(x, weight, bias, dtype, gelu):
    return _CpuBf16Linear.apply(x, weight, bias, dtype, gelu)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed by `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis of (batch, tokens, width)."""

    def __init__(self, width, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width, bias=qkv_bias)
        self.proj = Linear(width, width)

    def forward(self, x):  # (B', L, D)
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B', heads, L, head_dim)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x):  # fc2(GELU(fc1(x))), with the GELU inside fc2's product so that backward
        # keeps fc1's output only, not also GELU's (19 MB a block at 8x224, batch 2, bf16)
        return linear(self.fc1(x), self.fc2.weight, self.fc2.bias, gelu=True)


class Block(nn.Module):
    """One transformer block. Tokens arrive as a CLS token (B, 1, D) and patches (B, T, N, D)
    (space_only: one CLS per frame, (B, T, D))."""

    def __init__(self, cfg: TimeSformerConfig, drop_path: float):
        super().__init__()
        D = cfg.width
        self.attention_type = cfg.attention
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        if cfg.attention == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(D, eps=cfg.eps)
            self.temporal_attn = Attention(D, cfg.num_heads, cfg.qkv_bias)
            self.temporal_fc = Linear(D, D)  # zero at init: see TimeSformer.init_weights

    def keep(self, x):
        """Stochastic depth: a per-sample factor (B,) that zeroes a whole residual branch (CLS and
        patches alike) with probability drop_path, or None when nothing is dropped."""
        if not self.training or self.drop_path == 0.0:
            return None
        return x.new_empty(x.shape[0]).bernoulli_(1 - self.drop_path) / (1 - self.drop_path)

    def forward(self, cls, x):
        B, T, N, D = x.shape

        def residual(r, keep):  # r is (B, ...): scale each sample's branch by its keep factor
            return r if keep is None else r * keep.view(B, *([1] * (r.ndim - 1)))

        if self.attention_type == "divided_space_time":
            # 1. Temporal attention: each patch position attends over its T time steps. The CLS token
            #    takes no part, as in the official model. T = 1 is not skipped: there the branch is
            #    temporal_fc(proj(v)), exactly what the official code computes.
            xt = rearrange(x, "b t n d -> (b n) t d")
            rt = self.temporal_fc(self.temporal_attn(self.temporal_norm1(xt)))  # (B*N, T, D)
            x = x + residual(rearrange(rt, "(b n) t d -> b t n d", b=B), self.keep(x))
            # 2. Spatial attention, per frame, over that frame's N patches plus a copy of the CLS token;
            #    the T CLS outputs are averaged back into the one CLS residual.
            xs = torch.cat([cls.expand(B, T, D).unsqueeze(2), x], dim=2)  # (B, T, 1+N, D)
            rs = self.attn(self.norm1(rearrange(xs, "b t n d -> (b t) n d")))  # (B*T, 1+N, D)
            rs = rearrange(rs, "(b t) n d -> b t n d", b=B)
            keep = self.keep(x)
            cls = cls + residual(rs[:, :, 0].mean(dim=1, keepdim=True), keep)  # (B, 1, D)
            x = x + residual(rs[:, :, 1:], keep)
        elif self.attention_type == "joint_space_time":
            # One attention over the CLS token and all T*N patches.
            xj = torch.cat([cls, rearrange(x, "b t n d -> b (t n) d")], dim=1)  # (B, 1+T*N, D)
            rj = residual(self.attn(self.norm1(xj)), self.keep(x))
            cls, x = cls + rj[:, :1], x + rearrange(rj[:, 1:], "b (t n) d -> b t n d", t=T)
        else:  # space_only: each frame is an image with its own CLS token
            xs = torch.cat([cls.unsqueeze(2), x], dim=2)  # (B, T, 1+N, D)
            rs = self.attn(self.norm1(rearrange(xs, "b t n d -> (b t) n d")))  # (B*T, 1+N, D)
            xs = xs + residual(rearrange(rs, "(b t) n d -> b t n d", b=B), self.keep(x))
            cls, x = xs[:, :, 0], xs[:, :, 1:]
        # 3. MLP, applied to every token alike.
        keep = self.keep(x)
        cls = cls + residual(self.mlp(self.norm2(cls)), keep)
        x = x + residual(self.mlp(self.norm2(x)), keep)
        return cls, x


class TimeSformer(nn.Module):
    def __init__(self, cfg: TimeSformerConfig, heads=None):
        """heads: {dataset name: number of classes}, one linear classifier each. None or {} = no heads
        (feature extractor)."""
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        grid = cfg.img_size // p
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, D, kernel_size=p, stride=p)  # per frame
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))  # shared by all frames
        if cfg.attention != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, cfg.frames, D))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, 0 -> drop_path
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.heads = nn.ModuleDict({name: Linear(D, n) for name, n in (heads or {}).items()})
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if hasattr(self, "time_embed"):  # zero: a model fresh from image weights starts as that image model...
            nn.init.zeros_(self.time_embed)
            if self.cfg.time_embed_std:  # (from scratch only: see TimeSformerConfig.time_embed_std)
                s = self.cfg.time_embed_std
                nn.init.trunc_normal_(self.time_embed, std=s, a=-2 * s, b=2 * s)
        for blk in self.blocks:
            if hasattr(blk, "temporal_fc"):
                nn.init.zeros_(blk.temporal_fc.weight)  # ...because the temporal branch adds exactly zero
                nn.init.zeros_(blk.temporal_fc.bias)

    @classmethod
    def from_pretrained(cls, src, heads=None, verbose=True, **overrides):
        """See the module-level from_pretrained."""
        return from_pretrained(src, heads=heads, verbose=verbose, **overrides)

    def add_head(self, name, num_classes):
        head = Linear(self.cfg.width, num_classes).to(self.norm.weight.device)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.heads[name] = head

    def embed(self, x):
        """(B, C, T, H, W) float -> CLS token (B, 1, D) and patch tokens (B, T, N, D)."""
        B, C, T, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        # The 16x16 stride-16 Conv2d is a linear map of each flattened patch: computed as one (same
        # weights), so it takes the same GEMM path as every other layer.
        x = rearrange(x, "b c t (gh p1) (gw p2) -> b t (gh gw) (c p1 p2)", p1=p, p2=p)  # (B, T, N, C*p*p)
        x = linear(x, self.patch_embed.proj.weight.flatten(1), self.patch_embed.proj.bias)  # (B, T, N, D)
        pos = resize_pos_embed(self.pos_embed, (H // p, W // p))  # (1, 1+N, D)
        cls = self.cls_token + pos[:, :1]
        x = x + pos[:, 1:].unsqueeze(1)
        if self.cfg.attention == "space_only":
            return cls.expand(B, T, -1), x  # one CLS per frame, no time embedding (official)
        x = x + resize_time_embed(self.time_embed, T).unsqueeze(2)  # (1, T, 1, D)
        return cls.expand(B, -1, -1), x

    def forward_features(self, x):
        """(B, C, T, H, W) -> the final-normed CLS feature (B, D), what the heads read."""
        cls, x = self.embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                cls, x = checkpoint(blk, cls, x, use_reentrant=False)
            else:
                cls, x = blk(cls, x)
        if self.cfg.attention == "space_only":
            # Official space-only baseline: average every token over frames, then norm, then take CLS.
            return self.norm(cls.mean(dim=1))
        return self.norm(cls[:, 0])

    def forward(self, x, head=None):
        """(B, C, T, H, W) -> logits (B, classes) of `head` (may be omitted when there is one head)."""
        if head is None:
            if len(self.heads) != 1:
                raise ValueError(f"model has heads {list(self.heads)}: say which one with head=...")
            head = next(iter(self.heads))
        elif head not in self.heads:
            raise KeyError(f"no head {head!r}; the model has {list(self.heads)}")
        return self.heads[head](self.forward_features(x))

    def param_groups(self, weight_decay):
        """Optimizer groups that hold every parameter exactly once: weight decay on matrices and conv
        kernels only; none on biases, norms, pos_embed, time_embed, cls_token."""
        no_decay_names = {"cls_token", "pos_embed", "time_embed"}
        decay, no_decay = [], []
        for name, prm in self.named_parameters():
            (no_decay if prm.ndim < 2 or name in no_decay_names else decay).append(prm)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops(self, frames=None, img_size=None, head=None):  # img_size: int or (H, W)
        """Multiply-adds of one forward pass on one clip (the convention of the TimeSformer paper:
        0.196 T per 8x224 view for ViT-B). Counts matmuls, convs and attention; ignores norms,
        softmax and GELU. Training costs about 3x this; FLOPs in the usual sense are 2x."""
        c = self.cfg
        T, S = frames or c.frames, img_size or c.img_size
        H, W = (S, S) if isinstance(S, int) else S
        N, D = (H // c.patch_size) * (W // c.patch_size), c.width
        Dm = int(D * c.mlp_ratio)
        linear = lambda tokens, d_in, d_out: tokens * d_in * d_out  # noqa: E731
        attention = lambda seqs, L: 2 * seqs * L * L * D  # QK^T and AV, over all heads  # noqa: E731
        total = linear(T * N, c.in_chans * c.patch_size**2, D)  # patch embedding
        for _ in range(c.depth):
            if c.attention == "divided_space_time":
                total += linear(T * N, D, 3 * D) + attention(N, T) + 2 * linear(T * N, D, D)  # temporal
                total += linear(T * (1 + N), D, 4 * D) + attention(T, 1 + N)  # spatial (qkv+proj)
                total += linear(1 + T * N, D, 2 * Dm)  # MLP
            elif c.attention == "joint_space_time":
                total += linear(1 + T * N, D, 4 * D + 2 * Dm) + attention(1, 1 + T * N)
            else:
                total += linear(T * (1 + N), D, 4 * D + 2 * Dm) + attention(T, 1 + N)
        if head is not None:
            total += D * self.heads[head].out_features
        return total


def resize_pos_embed(pos, grid):
    """(1, 1+n*n, D) -> (1, 1+gh*gw, D): bicubic on the 2-D grid of patch positions (the flat list
    would scramble rows). The identity when the grid already matches."""
    n = math.isqrt(pos.shape[1] - 1)
    if (n, n) == tuple(grid):
        return pos
    cls, grid_pos = pos[:, :1], rearrange(pos[:, 1:], "o (h w) d -> o d h w", h=n)
    grid_pos = F.interpolate(grid_pos.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, rearrange(grid_pos.to(pos.dtype), "o d h w -> o (h w) d")], dim=1)


def resize_time_embed(time, T):
    """(1, T0, D) -> (1, T, D), nearest neighbour as the official code (an image, T = 1, gets row 0)."""
    if time.shape[1] == T:
        return time
    return F.interpolate(time.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# Loading weights: ImageNet ViT (timm layout), official TimeSformer (.pyth), Hugging Face folders, ours.


def _read_safetensors(path):
    """A .safetensors file is an 8-byte header length, a JSON header, then raw little-endian tensors.
    Reading it takes a few lines, so no extra dependency; like torch.load(weights_only=True) it
    cannot run code."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, (start, end) = dtypes[info["dtype"]], info["data_offsets"]
        count = (end - start) // dtype.itemsize
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=start) if count else torch.empty(0, dtype=dtype)
        out[key] = t.reshape(info["shape"])
    return out


def _read_file(path):
    if str(path).endswith(".safetensors"):
        return _read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# Hugging Face Timesformer names -> ours (which are the official TimeSformer / timm names).
_HF_TOP = {"timesformer.embeddings.cls_token": "cls_token",
           "timesformer.embeddings.position_embeddings": "pos_embed",
           "timesformer.embeddings.time_embeddings": "time_embed",
           "timesformer.embeddings.patch_embeddings.projection": "patch_embed.proj",
           "timesformer.layernorm": "norm", "classifier": "head"}
_HF_LAYER = {"layernorm_before": "norm1", "attention.attention.qkv": "attn.qkv", "attention.output.dense": "attn.proj",
             "temporal_layernorm": "temporal_norm1", "temporal_attention.attention.qkv": "temporal_attn.qkv",
             "temporal_attention.output.dense": "temporal_attn.proj", "temporal_dense": "temporal_fc",
             "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def _hf_key(key):
    """Hugging Face key -> ours, or None if it has no place here."""
    if key in _HF_TOP:  # parameters that are not a weight/bias of a module
        return _HF_TOP[key]
    module, param = key.rsplit(".", 1)
    if module in _HF_TOP:
        return f"{_HF_TOP[module]}.{param}"
    parts = module.split(".", 4)  # timesformer, encoder, layer, i, rest
    if parts[:3] == ["timesformer", "encoder", "layer"] and len(parts) == 5 and parts[4] in _HF_LAYER:
        return f"blocks.{parts[3]}.{_HF_LAYER[parts[4]]}.{param}"
    return None


def _load_source(src):
    """-> (format name, flat state dict in our key layout with the classifier as 'head.*', extra config)."""
    extra = {}
    if isinstance(src, (str, os.PathLike)):
        path = str(src)
        if os.path.isdir(path):  # a Hugging Face folder, as save_pretrained writes it
            cfg_path = os.path.join(path, "config.json")
            weights = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")]
            weights = [w for w in weights if os.path.exists(w)]
            if not os.path.exists(cfg_path) or not weights:
                raise ValueError(f"{path} is a folder but not a Hugging Face model folder "
                                 "(expected config.json and model.safetensors or pytorch_model.bin)")
            with open(cfg_path) as f:
                hf = json.load(f)
            extra = {"num_heads": hf.get("num_attention_heads"), "attention": hf.get("attention_type"),
                     "eps": hf.get("layer_norm_eps")}
            if hf.get("id2label"):
                extra["classes"] = [hf["id2label"][str(i)] for i in range(len(hf["id2label"]))]
            src = _read_file(weights[0])
        elif os.path.isfile(path):
            src = _read_file(path)
        else:
            raise FileNotFoundError(f"no checkpoint at {path}")
    sd = src
    if not isinstance(sd, dict):
        raise ValueError(f"unknown checkpoint format: got a {type(sd).__name__}, expected a dict")
    if "model_config" in sd and "model" in sd:  # ours (train.py's ckpt.pt)
        return "cover", dict(sd["model"]), {"config": sd["model_config"], "label_maps": sd.get("label_maps")}
    if "model_state" in sd:  # official TimeSformer .pyth (PySlowFast)
        sd = sd["model_state"]
    for wrapper in ("state_dict", "model"):  # DeiT and others wrap a timm state dict
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("unknown checkpoint format: expected a state dict of tensors, an official TimeSformer "
                         "'.pyth' (with 'model_state'), a Hugging Face folder, or a ckpt.pt of this project")
    if any(k.startswith("timesformer.") for k in sd):
        unplaced = [k for k in sd if _hf_key(k) is None]
        if unplaced:
            raise ValueError(f"Hugging Face Timesformer checkpoint has keys this model cannot place: {unplaced[:8]}")
        return "huggingface", {_hf_key(k): v for k, v in sd.items()}, extra
    if any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"unknown checkpoint format (first keys: {list(sd)[:5]}); expected ImageNet ViT "
                         "weights in timm's layout, an official TimeSformer .pyth, or a Hugging Face folder")
    fmt = "timesformer" if any(".temporal_attn." in k for k in sd) or "time_embed" in sd else "vit"
    return fmt, sd, extra


_DEFAULT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H


def _infer_config(sd, fmt, extra, overrides):
    """Read the architecture off the tensor shapes; what shapes cannot tell comes from extra/overrides."""
    D = sd["cls_token"].shape[-1]
    p = sd["patch_embed.proj.weight"].shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if fmt == "vit":
        attention = "divided_space_time"  # the temporal parts are initialised from the spatial ones
    elif any(".temporal_attn." in k for k in sd):
        attention = "divided_space_time"
    else:
        attention = extra.get("attention") or ("joint_space_time" if "time_embed" in sd else "space_only")
    cfg = dict(width=D, depth=depth, patch_size=p, img_size=math.isqrt(n) * p, attention=attention,
               in_chans=sd["patch_embed.proj.weight"].shape[1],
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, qkv_bias="blocks.0.attn.qkv.bias" in sd,
               num_heads=extra.get("num_heads") or _DEFAULT_HEADS.get(D))
    if "time_embed" in sd:
        cfg["frames"] = sd["time_embed"].shape[1]
    if extra.get("eps"):
        cfg["eps"] = extra["eps"]
    cfg.update(overrides)
    if cfg["num_heads"] is None:
        raise ValueError(f"cannot infer the number of attention heads for width {D}: pass num_heads=...")
    if math.isqrt(n) ** 2 != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    return TimeSformerConfig(**cfg)


def _from_vit(sd, cfg):
    """timm ViT -> TimeSformer: temporal attention and norm start as copies of the spatial ones,
    temporal_fc and time_embed at zero (set by init), so the model equals the ViT on T = 1."""
    sd = dict(sd)
    for i in range(cfg.depth):
        if cfg.attention == "divided_space_time":
            for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
                if f"blocks.{i}.attn.{part}" in sd:
                    sd[f"blocks.{i}.temporal_attn.{part}"] = sd[f"blocks.{i}.attn.{part}"].clone()
            for part in ("weight", "bias"):
                sd[f"blocks.{i}.temporal_norm1.{part}"] = sd[f"blocks.{i}.norm1.{part}"].clone()
    return sd


@torch.no_grad()
def from_pretrained(src, heads=None, verbose=True, **overrides):
    """Build a TimeSformer from a checkpoint path (file or folder) or an in-memory state dict.

    Formats, detected from the keys: ImageNet ViT in timm's layout (.pth/.safetensors), official
    TimeSformer (.pyth), Hugging Face Timesformer folders, and this project's ckpt.pt. The
    architecture is read off the shapes; `overrides` set TimeSformerConfig fields the shapes cannot
    tell (or change frames / img_size: time_embed and pos_embed are then resized).

    heads=None: the source classifier (if any) becomes the only head ('default'; for our own
    checkpoints, all saved heads). heads={name: classes}: the backbone is loaded and the heads are
    new, except that a head of ours with the same name and size is kept; a foreign classifier is
    always dropped then (its label order is unknown), and reported.
    """
    fmt, sd, extra = _load_source(src)
    if fmt == "cover":
        cfg = TimeSformerConfig(**{**extra["config"], **overrides})
        saved_heads = {k.split(".")[1]: v.shape[0] for k, v in sd.items() if k.startswith("heads.") and k.endswith(".bias")}
    else:
        cfg = _infer_config(sd, fmt, extra, overrides)
        if fmt == "vit":
            sd = _from_vit(sd, cfg)
        saved_heads = {}
        if "head.weight" in sd:
            w, b = sd.pop("head.weight"), sd.pop("head.bias")
            sd["heads.default.weight"], sd["heads.default.bias"] = w, b
            saved_heads = {"default": w.shape[0]}
    report = []
    if heads is None:
        heads = saved_heads
    for name, n in saved_heads.items():
        if heads.get(name) != n:
            report.append(f"dropped classifier '{name}' ({n} classes)")
            del sd[f"heads.{name}.weight"], sd[f"heads.{name}.bias"]
    model = TimeSformer(cfg, heads=heads)
    own = model.state_dict()
    for key, resize, what in [("pos_embed", lambda t: resize_pos_embed(t, (cfg.img_size // cfg.patch_size,) * 2), "img_size"),
                              ("time_embed", lambda t: resize_time_embed(t, cfg.frames), "frames")]:
        if key in sd and key in own and sd[key].shape != own[key].shape:
            report.append(f"resized {key} {tuple(sd[key].shape)} -> {tuple(own[key].shape)} for {what}")
            sd[key] = resize(sd[key].float())
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise ValueError(f"{fmt} checkpoint has keys this model cannot place: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} (architecture {cfg})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    fresh = sorted(set(own) - set(sd))
    allowed_fresh = lambda k: (k.startswith("heads.") or (fmt == "vit" and (k == "time_embed" or ".temporal_fc." in k)))  # noqa: E731
    missing = [k for k in fresh if not allowed_fresh(k)]
    if missing:
        raise ValueError(f"{fmt} checkpoint lacks {missing[:8]}{' ...' if len(missing) > 8 else ''}: "
                         f"it does not match the {cfg.attention} architecture")
    model.load_state_dict(sd, strict=False)  # strictness is checked above, with messages that say what
    if any(k.startswith("heads.") for k in fresh):
        report.append(f"new heads: {sorted({k.split('.')[1] for k in fresh if k.startswith('heads.')})}")
    model.load_report = [f"loaded {fmt} weights ({len(sd)} tensors)"] + report
    model.label_maps = extra.get("label_maps") or ({"default": extra["classes"]} if extra.get("classes") else None)
    if verbose:
        print("from_pretrained: " + "; ".join(model.load_report))
    return model
