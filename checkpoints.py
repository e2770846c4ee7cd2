"""
Checkpoints from elsewhere, translated to model.py's key layout: ImageNet ViTs in timm's layout,
official TimeSformer .pyth files (PySlowFast), Hugging Face Timesformer folders, and this project's
ckpt.pt. load() returns plain values (a state dict and config fields); model.TimeSformer.from_pretrained
builds the model from them, so this file never imports model.py.
"""

import json
import math
import os
import pickle
import re
import warnings
import zipfile

import torch

# Hugging Face Timesformer names -> ours (which are the official TimeSformer / timm names)
HF_TOP = {"timesformer.embeddings.cls_token": "cls_token",
          "timesformer.embeddings.position_embeddings": "pos_embed",
          "timesformer.embeddings.time_embeddings": "time_embed",
          "timesformer.embeddings.patch_embeddings.projection": "patch_embed.proj",
          "timesformer.layernorm": "norm",
          "classifier": "head"}
HF_LAYER = {"layernorm_before": "norm1",
            "attention.attention.qkv": "attn.qkv",
            "attention.output.dense": "attn.proj",
            "temporal_layernorm": "temporal_norm1",
            "temporal_attention.attention.qkv": "temporal_attn.qkv",
            "temporal_attention.output.dense": "temporal_attn.proj",
            "temporal_dense": "temporal_fc",
            "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2"}
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H: heads by width


def read_file(path):
    """A state dict from a .safetensors or a torch file; neither can run code. A file that does not read is
    a ValueError of one line saying what the file is, never torch's advice to unpickle it."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors files needs the safetensors package "
                              "(pip install safetensors)") from None
        try:
            return load_file(str(path))
        except Exception as e:  # the package's own error type, and OSError
            raise ValueError(f"{path} is not a whole safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():  # torch's note on a pickle's protocol: the error below says more
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} {what_it_is(path, e)}") from None


def what_it_is(path, error):
    """Why torch.load could not read `path`, from the file itself: missing, empty, cut short, another kind
    of file, or a pickle holding more than tensors."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a folder, not a checkpoint file"
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or error})"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if unsafe:  # a torch file or a pickle
        return (f"is not a checkpoint that loads safely: it holds Python objects ({unsafe[1]}) besides "
                "tensors, and unpickling them could run code")
    if head.startswith(b"PK\x03\x04"):  # a zip archive, as torch.save writes
        if not zipfile.is_zipfile(path):  # the archive's index is at its end
            return (f"is cut short ({size} bytes, the end of its zip archive missing): a save or copy that "
                    "did not finish")
        if not any(name.endswith("/data.pkl") for name in zipfile.ZipFile(path).namelist()):
            return "is a zip archive, not a PyTorch checkpoint"
        return "is a damaged PyTorch checkpoint (a record in it does not read)"
    if head.startswith(b"\x80"):  # a pickle: torch's legacy format, or Python's own
        if isinstance(error, EOFError):
            return f"is cut short ({size} bytes, its pickle ends early): a save or copy that did not finish"
        return "is a pickle, not a PyTorch checkpoint"
    return f"is not a PyTorch checkpoint (it begins {head!r})"


def hf_key(key):
    """A Hugging Face Timesformer key -> ours, or None if it has no place in our model."""
    if key in HF_TOP:
        return HF_TOP[key]
    module, param = key.rsplit(".", 1)
    if module in HF_TOP:
        return f"{HF_TOP[module]}.{param}"
    parts = module.split(".", 4)  # timesformer, encoder, layer, i, rest
    if parts[:3] == ["timesformer", "encoder", "layer"] and len(parts) == 5 and parts[4] in HF_LAYER:
        return f"blocks.{parts[3]}.{HF_LAYER[parts[4]]}.{param}"
    return None


def read_hf_folder(path):
    """A folder as save_pretrained writes it -> (state dict, config fields, class names or None)."""
    weights = [w for w in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, w))]
    if not os.path.exists(os.path.join(path, "config.json")) or not weights:
        raise ValueError(f"{path} is a folder but not a Hugging Face model folder "
                         "(expected config.json and model.safetensors or pytorch_model.bin)")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    config = {"num_heads": hf.get("num_attention_heads"), "attention": hf.get("attention_type"),
              "eps": hf.get("layer_norm_eps")}
    labels = hf.get("id2label")
    classes = [labels[str(i)] for i in range(len(labels))] if labels else None
    return read_file(os.path.join(path, weights[0])), config, classes


def load(src, overrides=None):
    """A path (file or folder) or an in-memory checkpoint -> (format, state dict, config, extra).

    format: 'cover' (ours), 'timesformer' (official), 'huggingface' or 'vit' (timm). The state dict
    uses our keys, a foreign classifier as heads.default. config holds TimeSformerConfig fields, the
    `overrides` applied; extra may hold 'label_maps' {head: class names}.
    """
    hf_config, classes = {}, None
    if isinstance(src, (str, os.PathLike)):
        if os.path.isdir(src):
            src, hf_config, classes = read_hf_folder(src)
        elif os.path.isfile(src):
            src = read_file(src)
        else:
            raise FileNotFoundError(f"no checkpoint at {src}")
    sd = src
    if not isinstance(sd, dict):
        raise ValueError(f"unknown checkpoint format: got a {type(sd).__name__}, expected a dict")
    if "model_config" in sd and "model" in sd:  # a ckpt.pt of train.py: its moving average if kept (--ema)
        state = dict(sd.get("ema") or sd["model"])
        flatten_patch_weight(state)
        config = {**sd["model_config"], **(overrides or {})}
        fmt = "cover (the moving average, --ema)" if sd.get("ema") else "cover"
        return fmt, state, config, {"label_maps": sd.get("label_maps")}
    if "model_state" in sd:  # official TimeSformer .pyth
        sd = sd["model_state"]
    for wrapper in ("state_dict", "model"):  # DeiT and others wrap a timm state dict
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("unknown checkpoint format: expected a state dict of tensors, an official "
                         "TimeSformer '.pyth' (with 'model_state'), a Hugging Face folder, or our ckpt.pt")
    if any(k.startswith("timesformer.") for k in sd):
        unplaced = [k for k in sd if hf_key(k) is None]
        if unplaced:
            raise ValueError(f"Hugging Face checkpoint has keys we cannot place: {first_few(unplaced)}")
        fmt, sd = "huggingface", {hf_key(k): v for k, v in sd.items()}
    else:
        sd = {k.removeprefix("model."): v for k, v in sd.items()}  # PySlowFast prefixes every key
        if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
            raise ValueError(f"unknown checkpoint format (first keys: {list(sd)[:5]}); expected ImageNet "
                             "ViT weights in timm's layout, an official TimeSformer .pyth or a Hugging Face "
                             "folder")
        fmt = "timesformer" if any(".temporal_attn." in k for k in sd) or "time_embed" in sd else "vit"
    if "head.weight" in sd:
        sd["heads.default.weight"], sd["heads.default.bias"] = sd.pop("head.weight"), sd.pop("head.bias")
    config = {**infer_config(sd, fmt, hf_config), **(overrides or {})}
    if config["num_heads"] is None:
        raise ValueError(f"cannot infer the number of attention heads for width {config['width']}: "
                         "pass num_heads=...")
    flatten_patch_weight(sd)
    if fmt == "vit" and config.get("attention", "divided_space_time") == "divided_space_time":
        inflate_vit(sd)
    extra = {"label_maps": {"default": classes}} if classes else {}
    return fmt, sd, config, extra


def inflate_vit(sd):
    """timm ViT -> divided space-time, as the official code: temporal attention and norm start as copies
    of the spatial ones; temporal_fc and time_embed stay at their zero init."""
    for key in [k for k in sd if k.startswith("blocks.")]:
        for spatial, temporal in ((".attn.", ".temporal_attn."), (".norm1.", ".temporal_norm1.")):
            if spatial in key:
                sd[key.replace(spatial, temporal)] = sd[key].clone()


def flatten_patch_weight(sd):
    """The patch embedding's Conv2d weight (D, C, p, p) as the matmul weight (D, C*p*p) we keep."""
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        sd["patch_embed.proj.weight"] = w.flatten(1)


def infer_config(sd, fmt, hf_config):
    """TimeSformerConfig fields read off the tensor shapes; the rest from a Hugging Face config.json."""
    D, n = sd["cls_token"].shape[-1], sd["pos_embed"].shape[1] - 1
    w = sd["patch_embed.proj.weight"]  # (D, C, p, p), or already flat (D, C*p*p) with C = 3
    in_chans, p = (w.shape[1], w.shape[-1]) if w.ndim == 4 else (3, math.isqrt(w.shape[1] // 3))
    if math.isqrt(n) ** 2 != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    if fmt == "vit" or any(".temporal_attn." in k for k in sd):
        attention = "divided_space_time"  # a ViT's temporal parts are made from its spatial ones
    else:
        attention = hf_config.get("attention") or ("joint_space_time" if "time_embed" in sd else "space_only")
    config = dict(width=D, depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                  patch_size=p, in_chans=in_chans, img_size=math.isqrt(n) * p, attention=attention,
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd)
    config["num_heads"] = hf_config.get("num_heads") or VIT_HEADS.get(D)  # None: the caller must say
    if "time_embed" in sd:
        config["frames"] = sd["time_embed"].shape[1]
    if hf_config.get("eps"):
        config["eps"] = hf_config["eps"]
    return config


def check_keys(sd, shapes, fmt, cfg):
    """Every tensor of the checkpoint must have a place in the model, of the same shape, and every tensor
    of the model must come from the checkpoint, except new heads and what a ViT is inflated with."""
    unexpected = sorted(set(sd) - set(shapes))
    if unexpected:
        raise ValueError(f"{fmt} checkpoint has keys this model cannot place: {first_few(unexpected)} "
                         f"(architecture {cfg})")
    for k, v in sd.items():
        if v.shape != shapes[k]:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(shapes[k])}")
    inflated = ("time_embed", ".temporal_fc.") if fmt == "vit" else ()  # zero at init, as the official code
    missing = [k for k in shapes if k not in sd and not k.startswith("heads.")
               and not any(part in k for part in inflated)]
    if missing:
        raise ValueError(f"{fmt} checkpoint lacks {first_few(missing)}: it does not match the "
                         f"{cfg.attention} architecture")


def first_few(keys, n=8):
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"
