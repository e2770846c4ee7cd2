"""
TimeSformer (Bertasius et al., 2021) with one classification head per dataset, as CoVeR (Zhang et al.,
2021) co-trains it on videos and on images, which enter as single-frame videos: input is (B, C, T, H, W)
and T, H, W are read from it. Read in order: TimeSformerConfig, Attention, Block, DividedSpaceTime (the
paper's attention; the other types beside it), TimeSformer, from_pretrained (foreign layouts: checkpoints.py).
"""

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import checkpoints

SDPA_MAX_BATCH = 65_535  # CUDA flash attention fails on more sequences in one call (pytorch#146704)


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
    drop_path: float = 0.1  # stochastic depth at the last block, rising linearly from 0 at the first
    qkv_bias: bool = True
    eps: float = 1e-6
    # 0 is the official init, made for starting from image weights. From scratch a zero time_embed
    # makes the model blind to the order of frames, so the demo draws it at random.
    time_embed_std: float = 0.0

    def __post_init__(self):
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {list(ATTENTION_TYPES)}, got {self.attention!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


PRESETS = {  # the usual ViT sizes; 'demo' trains on a CPU in minutes
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


def attention(q, k, v):
    """Softmax attention over (sequences, heads, L, head_dim)."""
    if q.shape[2] == 1:  # one key: the softmax is 1 and the output is v (temporal attention on images)
        return v
    if q.shape[0] > SDPA_MAX_BATCH:
        chunks = zip(q.split(SDPA_MAX_BATCH), k.split(SDPA_MAX_BATCH), v.split(SDPA_MAX_BATCH))
        return torch.cat([F.scaled_dot_product_attention(*qkv) for qkv in chunks])
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention over the tokens of (sequences, tokens, width)."""

    def __init__(self, width, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (B', L, D)
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.proj(rearrange(attention(q, k, v), "b h l d -> b l (h d)"))


def drop_path(r, keep):
    """Stochastic depth: each sample's residual branch r (B, ...) times its keep factor (B,); None: off."""
    return r if keep is None else r * keep.view(-1, *([1] * (r.ndim - 1)))


class Block(nn.Module):
    """A pre-norm transformer block on a CLS token (B, 1, D) and patches (B, T, N, D): the attention type's
    residual branches (`attend(cls, x) -> (cls, x)`, one per type below), then an MLP on every token. norm1
    and attn keep the image ViT's names, so image weights load by name; an attention type adds what it needs."""

    uses_time_embed = True  # does the model add a time embedding to the patches before the first block

    def __init__(self, cfg: TimeSformerConfig, drop_rate: float):
        super().__init__()
        D, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.drop_rate = drop_rate
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(D, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, D)))

    def keep(self, x):
        """Per-sample factors (B,) that drop a whole residual branch in training, or None."""
        if not self.training or self.drop_rate == 0.0:
            return None
        return x.new_empty(x.shape[0]).bernoulli_(1 - self.drop_rate) / (1 - self.drop_rate)

    def forward(self, cls, x):
        cls, x = self.attend(cls, x)
        # 3. MLP on every token: the CLS token(s) and the patches in one sequence (one call of each layer, not
        #    a second chain of tiny ones for the CLS token), with one drop-path draw
        B, T, N, D = x.shape
        tokens = torch.cat([cls, x.flatten(1, 2)], dim=1)  # (B, C + T*N, D), C CLS tokens
        tokens = tokens + drop_path(self.mlp(self.norm2(tokens)), self.keep(x))
        cls, x = tokens.split([cls.shape[1], T * N], dim=1)  # views; a split's gradient is one cat
        return cls, x.unflatten(1, (T, N))


class DividedSpaceTime(Block):
    """TimeSformer's divided space-time attention, the paper's best: temporal attention, then spatial.
    Here self.attn is the spatial attention; the temporal one has its own norm, attention and output map."""

    def __init__(self, cfg: TimeSformerConfig, drop_rate: float):
        super().__init__(cfg, drop_rate)
        self.temporal_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.temporal_attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias)
        self.temporal_fc = nn.Linear(cfg.width, cfg.width)  # zero at init, see TimeSformer.init_weights

    def attend(self, cls, x):
        B, T, N, D = x.shape
        # 1. Temporal attention: each patch position attends over its T time steps; the CLS token takes no
        #    part, as in the official model. At T = 1 the branch is temporal_fc(proj(v)), as there too.
        xt = self.temporal_attn(self.temporal_norm1(rearrange(x, "b t n d -> (b n) t d")))  # (B*N, T, D)
        xt = rearrange(self.temporal_fc(xt), "(b n) t d -> b t n d", b=B)
        x = x + drop_path(xt, self.keep(x))
        # 2. Spatial attention per frame, over its N patches and a copy of the CLS token; the T CLS outputs
        #    are averaged into the one CLS residual.
        xs = torch.cat([cls.expand(B, T, D).unsqueeze(2), x], dim=2)  # (B, T, 1+N, D)
        xs = self.attn(self.norm1(rearrange(xs, "b t n d -> (b t) n d")))  # (B*T, 1+N, D)
        cls_s, xs = rearrange(xs, "(b t) n d -> b t n d", b=B).split([1, N], dim=2)  # (B, T, 1, D), (B, T, N, D)
        keep = self.keep(x)
        cls = cls + drop_path(cls_s.mean(dim=1), keep)  # (B, 1, D)
        x = x + drop_path(xs, keep)
        return cls, x


class JointSpaceTime(Block):
    """One attention over the CLS token and all T*N patches."""

    def attend(self, cls, x):
        B, T, N, D = x.shape
        xj = torch.cat([cls, rearrange(x, "b t n d -> b (t n) d")], dim=1)  # (B, 1+T*N, D)
        cls_j, xj = drop_path(self.attn(self.norm1(xj)), self.keep(x)).split([1, T * N], dim=1)
        return cls + cls_j, x + rearrange(xj, "b (t n) d -> b t n d", t=T)


class SpaceOnly(Block):
    """Each frame an image with its own CLS token: the model's one CLS token (B, 1, D) becomes T of them
    (B, T, D) at the first block; the model averages them at the end. No time embedding (official)."""

    uses_time_embed = False

    def attend(self, cls, x):
        B, T, N, D = x.shape
        xs = torch.cat([cls.expand(B, T, D).unsqueeze(2), x], dim=2)  # (B, T, 1+N, D)
        rs = self.attn(self.norm1(rearrange(xs, "b t n d -> (b t) n d")))  # (B*T, 1+N, D)
        xs = xs + drop_path(rearrange(rs, "(b t) n d -> b t n d", b=B), self.keep(x))
        cls, x = xs.split([1, N], dim=2)  # (B, T, 1, D), (B, T, N, D)
        return cls.squeeze(2), x


# The attention types by name (TimeSformerConfig.attention, train.py --attention). A new type is a subclass
# of Block with its own attend(cls, x) -> (cls, x), and one entry here.
ATTENTION_TYPES = {"divided_space_time": DividedSpaceTime, "joint_space_time": JointSpaceTime,
                   "space_only": SpaceOnly}


class PatchEmbed(nn.Module):
    """Each frame cut into p x p patches, each projected linearly: the official stride-p Conv2d,
    computed as the matmul it is (the converter flattens a conv weight to this shape)."""

    def __init__(self, in_chans, width, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size * patch_size, width)

    def forward(self, x):  # (B, C, T, H, W) -> (B, T, N, D)
        p = self.patch_size
        return self.proj(rearrange(x, "b c t (gh p1) (gw p2) -> b t (gh gw) (c p1 p2)", p1=p, p2=p))


class TimeSformer(nn.Module):
    def __init__(self, cfg: TimeSformerConfig, heads=None):
        """heads: {dataset name: number of classes}; None or {} gives a feature extractor."""
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.width, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))  # shared by all frames
        block = ATTENTION_TYPES[cfg.attention]
        if block.uses_time_embed:
            self.time_embed = nn.Parameter(torch.zeros(1, cfg.frames, D))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.eps)
        self.heads = nn.ModuleDict({name: nn.Linear(D, n) for name, n in (heads or {}).items()})
        self.grad_checkpointing = False
        self.compiled_trunk, self.compiled_shapes = None, None  # compile_trunk()
        self.normalization = None  # the mean and std the weights were trained with: from_pretrained
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.patch_embed.proj:  # that one keeps the conv init
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:  # qkv_bias=False
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if hasattr(self, "time_embed") and self.cfg.time_embed_std:
            s = self.cfg.time_embed_std
            nn.init.trunc_normal_(self.time_embed, std=s, a=-2 * s, b=2 * s)
        for blk in self.blocks:
            if hasattr(blk, "temporal_fc"):  # zero: a model made from image weights starts as that model
                nn.init.zeros_(blk.temporal_fc.weight)
                nn.init.zeros_(blk.temporal_fc.bias)

    def embed(self, x):
        """(B, C, T, H, W) -> CLS token (B, 1, D) and patch tokens (B, T, N, D)."""
        B, C, T, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)  # (B, T, N, D)
        pos_cls, pos = resize_pos_embed(self.pos_embed, (H // p, W // p)).split([1, x.shape[2]], dim=1)  # 1, N
        cls = self.cls_token + pos_cls
        x = x + pos.unsqueeze(1)
        if hasattr(self, "time_embed"):
            x = x + resize_time_embed(self.time_embed, T).unsqueeze(2)  # (1, T, 1, D)
        return cls.expand(B, -1, -1), x

    def forward_features(self, x):
        """(B, C, T, H, W) -> the final-normed CLS feature (B, D) that every head reads."""
        cls, x = self.embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                cls, x = checkpoint(blk, cls, x, use_reentrant=False)
            else:
                cls, x = blk(cls, x)
        cls = cls.squeeze(1) if cls.shape[1] == 1 else cls.mean(dim=1)  # (B, D); a CLS token per frame: their mean
        return self.norm(cls)

    def forward(self, x, head=None):
        """(B, C, T, H, W) -> logits (B, classes) of `head` (optional when there is one head)."""
        if head is None:
            if len(self.heads) != 1:
                raise ValueError(f"model has heads {list(self.heads)}: say which one with head=...")
            head = next(iter(self.heads))
        elif head not in self.heads:
            raise KeyError(f"no head {head!r}; the model has {list(self.heads)}")
        compiled = self.training and self.compiled_trunk is not None and (
            self.compiled_shapes is None or tuple(x.shape) in self.compiled_shapes)
        trunk = self.compiled_trunk if compiled else self.forward_features  # evaluation, other shapes: plain
        return self.heads[head](trunk(x))

    def compile_trunk(self, shapes=None, **kwargs):
        """torch.compile the trunk for training, not the heads: one graph per input shape, not per head and
        shape, each with static shapes. shapes: the (B, C, T, H, W) that run compiled, training's full batches
        (clips and images: two graphs); a batch of another shape, one that lost samples, runs the plain trunk
        rather than compile a graph of its own (None: every shape compiles). Evaluation runs the plain trunk."""
        self.compiled_shapes = None if shapes is None else {tuple(s) for s in shapes}
        self.compiled_trunk = torch.compile(self.forward_features, dynamic=False, **kwargs)

    def param_groups(self, weight_decay, layer_decay=1.0):
        """Every parameter once; weight decay on matrices only, not on biases, norms and embeddings. Each
        group's lr_scale (layer_decay < 1 when fine-tuning): layer_decay ** (depth - i) for block i counted
        from 0 at the input, ** (depth + 1) for the embeddings, 1 for the final norm and the heads."""
        no_decay_names = {"cls_token", "pos_embed", "time_embed"}
        groups = {}  # (lr_scale, decayed) -> group
        for name, prm in self.named_parameters():
            decayed = prm.ndim >= 2 and name not in no_decay_names
            if name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            else:  # the embeddings are layer 0, the final norm and the heads the top
                layer = self.cfg.depth + 1 if name.startswith(("norm.", "heads.")) else 0
            scale = layer_decay ** (self.cfg.depth + 1 - layer)
            group = {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            groups.setdefault((scale, decayed), group)["params"].append(prm)
        return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]  # decayed first

    def flops(self, frames=None, img_size=None, head=None):
        """Multiply-adds of one forward pass on one clip, the paper's convention (0.196 T for ViT-B at 8x224),
        as PyTorch's FLOP counter sees a copy of the model on the meta device (no memory, no compute), so the
        count follows the code of any attention type. Matmuls and attention; img_size: an int or (H, W)."""
        c, S = self.cfg, img_size or self.cfg.img_size
        H, W = (S, S) if isinstance(S, int) else S
        heads = {} if head is None else {head: self.heads[head].out_features}
        with torch.device("meta"):
            model, x = type(self)(c, heads=heads).eval(), torch.empty(1, c.in_chans, frames or c.frames, H, W)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            features = model.forward_features(x)
            if head is not None:
                model.heads[head](features)
        return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2

    @classmethod
    @torch.no_grad()
    def from_pretrained(cls, src, heads=None, verbose=True, **overrides):
        """A TimeSformer from a checkpoint path (file or folder), a Hub name (hf-hub:<org>/<name>[@<revision>])
        or a state dict: a timm or Transformers ImageNet ViT, an official TimeSformer .pyth, a Transformers
        Timesformer or our ckpt.pt. The shapes give the architecture; `overrides` give what they cannot (a ViT's
        attention type; video weights keep theirs), or change frames / img_size (the embeddings are resized).
        heads=None keeps the source's classifiers; heads={name: classes} makes new heads, keeping a head of ours
        with the same name and size. model.normalization: the mean and std the weights were trained with, where
        their files say ({'mean', 'std', 'from'}), else None."""
        fmt, sd, config, extra = checkpoints.load(src, overrides)
        cfg = TimeSformerConfig(**config)
        saved = {k.split(".")[1]: v.shape[0] for k, v in sd.items() if k.startswith("heads.") and "bias" in k}
        heads = saved if heads is None else heads
        report = []
        for name, n in saved.items():
            if heads.get(name) != n:
                report.append(f"dropped classifier '{name}' ({n} classes)")
                del sd[f"heads.{name}.weight"], sd[f"heads.{name}.bias"]
        model = cls(cfg, heads=heads)
        own = model.state_dict()
        grid = (cfg.img_size // cfg.patch_size,) * 2
        for key, resize in [("pos_embed", lambda t: resize_pos_embed(t, grid)),
                            ("time_embed", lambda t: resize_time_embed(t, cfg.frames))]:
            if key in sd and key in own and sd[key].shape != own[key].shape:
                report.append(f"resized {key} {tuple(sd[key].shape)} -> {tuple(own[key].shape)}")
                sd[key] = resize(sd[key].float())
        checkpoints.check_keys(sd, {k: v.shape for k, v in own.items()}, fmt, cfg)
        model.load_state_dict(sd, strict=False)  # checked above, with messages that say what is wrong
        new_heads = [n for n in heads if f"heads.{n}.weight" not in sd]
        if new_heads:
            report.append(f"new heads: {new_heads}")
        model.load_report = [f"loaded {fmt} weights ({len(sd)} tensors)"] + extra.get("notes", []) + report
        model.label_maps, model.normalization = extra.get("label_maps"), extra.get("normalization")
        if model.normalization:
            mean, std = (",".join(map(str, model.normalization[k])) for k in ("mean", "std"))
            model.load_report.append(f"their normalisation: mean {mean}, std {std} ({model.normalization['from']})")
        if verbose:
            print("from_pretrained: " + "; ".join(model.load_report))
        return model


def resize_pos_embed(pos, grid):
    """(1, 1+n*n, D) -> (1, 1+gh*gw, D), bicubic on the 2-D grid of patch positions (resizing the flat
    list would scramble rows)."""
    n = math.isqrt(pos.shape[1] - 1)
    if (n, n) == tuple(grid):
        return pos
    cls, grid_pos = pos[:, :1], rearrange(pos[:, 1:], "o (h w) d -> o d h w", h=n)
    grid_pos = F.interpolate(grid_pos.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, rearrange(grid_pos.to(pos.dtype), "o d h w -> o (h w) d")], dim=1)


def resize_time_embed(time, T):
    """(1, T0, D) -> (1, T, D), nearest neighbour as the official code (an image gets row 0)."""
    if time.shape[1] == T:
        return time
    return F.interpolate(time.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
