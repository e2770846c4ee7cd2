"""Shared by the model and checkpoint tests: a small config, random weights, foreign key layouts, a
plain ViT written out with no code shared with model.py, checkpoint files spoilt as disks leave them, a
Hugging Face Hub cache laid out as huggingface_hub lays out a download, and, for the loader tests, the
process reading a file, found in /proc and signalled mid-read."""

import errno
import hashlib
import math
import os
import time
import zipfile

import torch
import torch.nn.functional as F

import model as M


def reference_attention(q, k, v):
    """Softmax attention written out, to check the SDPA path against."""
    w = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return w.softmax(dim=-1) @ v


def reference_vit(sd, x, heads, eps=1e-6):
    """A plain ViT forward on images (B, C, H, W) from a timm-layout state dict."""
    p = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]

    def ln(z, pre):
        return F.layer_norm(z, z.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps)

    def lin(z, pre):
        return F.linear(z, sd[pre + ".weight"], sd[pre + ".bias"])

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


def conv_layout(sd, cfg):
    """Our state dict with the patch embedding as the Conv2d weight (D, C, p, p) other code bases store."""
    sd = dict(sd)
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].reshape(cfg.width, cfg.in_chans, cfg.patch_size,
                                                                          cfg.patch_size)
    return sd


def timm_state_dict(cfg, classes=10, seed=0):
    """Random ViT weights in timm's key layout (no temporal parts, no time_embed)."""
    torch.manual_seed(seed)
    m = M.TimeSformer(cfg, heads={"x": classes})
    sd = {k: v.clone() for k, v in m.state_dict().items()
          if "temporal" not in k and k != "time_embed" and not k.startswith("heads.")}
    for k in sd:
        if k.endswith(".bias") or "norm" in k:
            sd[k] += 0.1 * torch.randn_like(sd[k])  # non-trivial norms and biases
    sd["head.weight"], sd["head.bias"] = torch.randn(classes, cfg.width) * 0.1, torch.randn(classes)
    return conv_layout(sd, cfg)


def randomize_(model, seed=0):
    """Every parameter random, including temporal_fc and time_embed (zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def spoil(path, kind):
    """Replace a good checkpoint file by a spoilt one of `kind`, as disks, copies and users leave them."""
    good = path.read_bytes() if path.is_file() else b""
    if kind == "folder":
        path.unlink(missing_ok=True)
        path.mkdir()
        return
    path.write_bytes({"truncated": good[:len(good) // 2], "empty": b"", "garbage": b"\x13\x37 not a checkpoint" * 50,
                      "text": b"# a README given by mistake\n",
                      "note": b"a note given by mistake\n"}.get(kind, b""))  # 'a': a pickle opcode
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "a zip archive of something else")


def readers_of(path):
    """The processes but this one that have the file `path` open, from /proc."""
    pids = []
    for pid in set(filter(str.isdigit, os.listdir("/proc"))) - {str(os.getpid())}:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                pids.append(int(pid))
        except OSError:  # gone, or a file descriptor closed meanwhile
            continue
    return pids


def signal_the_reader(fifo, sig, timeout=300):
    """Wait until a process opens the FIFO to read, let its open return (as a writer), and send it `sig`:
    it is then in the middle of reading that sample. -> its pid."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader waits in open()
            break
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        while not (pids := readers_of(fifo)):
            time.sleep(0.01)
        os.kill(pids[0], sig)
        return pids[0]
    finally:
        os.close(fd)


def hub_cache(cache, repo, folder):
    """The files of `folder` as huggingface_hub caches a download of model `repo` in `cache` (HF_HUB_CACHE,
    or HF_HOME/hub): models--<org>--<name>/ with blobs/<sha256>, snapshots/<commit>/<file> linking to its
    blob, and refs/main naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (root / "snapshots" / commit / f.name).symlink_to(os.path.relpath(blob, root / "snapshots" / commit))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
