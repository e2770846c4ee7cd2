"""
Checkpoints from elsewhere, translated to model.py's key layout: ImageNet ViTs in timm's layout, official
TimeSformer .pyth files (PySlowFast), Hugging Face Transformers' Timesformer and ViT folders, Hub models by
name (hf-hub:<org>/<name>), and this project's ckpt.pt. load() returns plain values (a state dict, config
fields, and what the weights say of themselves: class names, their normalisation); model.TimeSformer.
from_pretrained builds the model from them, so this file never imports model.py.
"""

import json
import math
import os
import re
import warnings
import zipfile

import torch

# Transformers' names -> ours (which are the official TimeSformer / timm names); tools/export.py reads the
# same tables backwards. Top-level modules sit under the model's prefix (timesformer., vit., or none for a
# bare ViTModel), a block's under <prefix>encoder.layer.<i>., the classifier at the top.
HF_TOP = {"embeddings.cls_token": "cls_token",
          "embeddings.position_embeddings": "pos_embed",
          "embeddings.time_embeddings": "time_embed",
          "embeddings.patch_embeddings.projection": "patch_embed.proj",
          "layernorm": "norm"}
HF_LAYER = {"layernorm_before": "norm1",
            "attention.attention.qkv": "attn.qkv",  # Transformers' ViT keeps query, key, value apart: join_qkv
            "attention.output.dense": "attn.proj",
            "temporal_layernorm": "temporal_norm1",
            "temporal_attention.attention.qkv": "temporal_attn.qkv",
            "temporal_attention.output.dense": "temporal_attn.proj",
            "temporal_dense": "temporal_fc",
            "layernorm_after": "norm2",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2"}
HF_HEAD = "classifier"
HF_PREFIXES = {"timesformer": "timesformer.", "vit": "vit."}  # model_type -> the prefix of its trunk's keys
VIT_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT-Ti/S/B/L/H: heads by width
HUB = ("hf-hub:", "hf_hub:")  # timm's spelling of a Hub model id, <org>/<name>[@<revision>], and its older one
HUB_FILES = ["config.json", "preprocessor_config.json"]  # and one weights file, whole or sharded: hub_folder
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a folder's weights; a sharded one has <name>.index.json
EPS = {"vit": 1e-12, "timesformer": 1e-6}  # Transformers' layer_norm_eps where a config.json leaves it out


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
    except Exception as e:  # a file of other bytes fails the unpickler in many ways; the bytes say what it is
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


def hub_folder(name):
    """'hf-hub:<org>/<name>[@<revision>]' -> a local folder of its config files and one weights file, through
    huggingface_hub (an optional package) and its cache, so HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE=1 work
    as they do for any Hub user. Only files that hold no code are fetched. ImportError or ValueError, one line."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"{name}: a Hub name needs the huggingface_hub package (pip install huggingface_hub)") \
            from None
    repo, _, revision = name.split(":", 1)[1].partition("@")
    try:
        for weights in weights_order():  # the first the repo holds (older repos hold a torch file only)
            stem, ext = os.path.splitext(weights)
            folder = huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES + [
                weights, weights + ".index.json", f"{stem}-*-of-*{ext}"])
            if any(os.path.exists(os.path.join(folder, f)) for f in (weights, weights + ".index.json")):
                break
    except (OSError, ValueError) as e:  # huggingface_hub's errors are of both kinds
        raise ValueError(f"{name}: {hub_trouble(e, repo, revision)}") from None
    return folder


def hub_trouble(error, repo, revision):
    """What went wrong in huggingface_hub, as a clause that names the fix."""
    from huggingface_hub import __version__, constants
    from huggingface_hub.utils import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    new_cli = tuple(int(v) for v in re.findall(r"\d+", __version__)[:2]) >= (0, 34)  # its command line
    cli, login = ("hf", "hf auth login") if new_cli else ("huggingface-cli", "huggingface-cli login")
    if isinstance(error, LocalEntryNotFoundError):
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        at = f" --revision {revision}" if revision else ""
        return (f"not in the Hugging Face cache {constants.HF_HUB_CACHE}, and the Hub cannot be reached{offline}: "
                f"download it where there is internet ({cli} download {repo}{at}) and copy that cache here, or "
                "point HF_HOME at one that has it")
    if isinstance(error, GatedRepoError):
        return f"a gated model: accept its terms at https://huggingface.co/{repo}, then {login}"
    if isinstance(error, RepositoryNotFoundError):
        return f"no such model on the Hugging Face Hub (a private one needs {login})"
    if isinstance(error, RevisionNotFoundError):
        return f"the model has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(error, HFValidationError):
        return "not a Hub model id; say hf-hub:<org>/<name> or hf-hub:<org>/<name>@<revision>"
    first_line = str(error).partition("\n")[0]
    return f"huggingface_hub could not fetch it ({type(error).__name__}: {first_line})"


def hf_key(key, prefix):
    """A Transformers key (Timesformer's or ViT's trunk under `prefix`) -> ours, or None if it has no place."""
    if key.startswith(HF_HEAD + "."):
        return "head." + key.removeprefix(HF_HEAD + ".")
    if not key.startswith(prefix):
        return None
    key = key.removeprefix(prefix)
    if key in HF_TOP:
        return HF_TOP[key]
    module, param = key.rsplit(".", 1)
    if module in HF_TOP:
        return f"{HF_TOP[module]}.{param}"
    parts = module.split(".", 3)  # encoder, layer, i, rest
    if parts[:2] == ["encoder", "layer"] and len(parts) == 4 and parts[3] in HF_LAYER:
        return f"blocks.{parts[2]}.{HF_LAYER[parts[3]]}.{param}"
    return None


def from_transformers(sd, prefix):
    """A Transformers state dict (trunk keys under `prefix`) -> (ours, notes on what was dropped)."""
    sd, notes = dict(sd), []
    for key in [k for k in sd if ".attention.attention.query." in k]:  # ViT: one qkv, rows q, k, v (timm's)
        sd[key.replace(".query.", ".qkv.")] = torch.cat([sd.pop(key.replace(".query.", f".{part}."))
                                                         for part in ("query", "key", "value")])
    pooler = [k for k in sd if k.startswith(prefix + "pooler.")]
    if pooler:  # no head reads it: ours, as ViTForImageClassification's, read the final-normed CLS token
        notes.append(f"dropped {', '.join(pooler)} (ViTModel's pooler, a tanh layer on the CLS token, which no "
                     "head reads)")
    unplaced = [k for k in sd if k not in pooler and hf_key(k, prefix) is None]
    if unplaced:
        raise ValueError(f"Transformers checkpoint has keys we cannot place: {first_few(unplaced)}")
    return {hf_key(k, prefix): v for k, v in sd.items() if k not in pooler}, notes


def read_folder(path, where):
    """A model folder (Transformers' save_pretrained, timm's push_to_hub, a Hub snapshot) -> (state dict,
    config fields, extra: the class names and the normalisation its config files give, and notes on what they
    leave unsaid). `where` names it."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{where} is a folder but not a Hugging Face model folder (expected config.json)")
    hf, notes = read_json(path, "config.json"), []
    if "model_type" in hf:  # Transformers
        kind = hf["model_type"]
        if kind not in HF_PREFIXES:
            raise ValueError(f"{where} holds a Transformers {kind} model ({', '.join(hf.get('architectures') or [])}),"
                             " not a ViT or a Timesformer")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r}; our MLP has the exact gelu")
        config = {"model_type": kind, "num_heads": hf.get("num_attention_heads"),
                  "attention": hf.get("attention_type"), "eps": hf.get("layer_norm_eps", EPS[kind])}
        classes = class_names(hf.get("id2label"), f"{where}: config.json's id2label", notes)
        pre, source = read_json(path, "preprocessor_config.json"), f"{where}, preprocessor_config.json"
        if not pre:
            notes.append(f"{where} has no preprocessor_config.json: their normalisation is not known")
        if pre.get("do_normalize", True) is False:  # the processor passes pixels on as they are, in [0, 1]
            norm = mean_std(0.0, 1.0, f"{source} (do_normalize false)")
        else:
            norm = said_normalization(pre, ("image_mean", "image_std"), source, notes) if pre else None
    elif "architecture" in hf:  # timm
        if not hf["architecture"].startswith(("vit_", "deit")):
            raise ValueError(f"{where} holds timm's {hf['architecture']}, not a ViT")
        config, pretrained = {}, hf.get("pretrained_cfg", hf)  # older files keep its fields at the top
        classes = hf.get("label_names") or pretrained.get("label_names")
        norm = said_normalization(pretrained, ("mean", "std"), f"{where}, config.json pretrained_cfg", notes)
    else:
        raise ValueError(f"{where}: config.json is neither Transformers' (model_type) nor timm's (architecture)")
    return read_weights(path, where), config, {"classes": classes, "normalization": norm, "notes": notes}


def weights_order():
    """WEIGHTS in the order a folder's are read: pytorch_model.bin first where safetensors is not installed."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return WEIGHTS[::-1]
    return WEIGHTS


def read_weights(folder, where):
    """A folder's state dict: the first of weights_order() it holds, whole or in the shards its index names."""
    for name in weights_order():
        if os.path.exists(os.path.join(folder, name)):
            return read_file(os.path.join(folder, name))
        shards = read_json(folder, name + ".index.json").get("weight_map")
        if shards:
            sd = {}
            for shard in sorted(set(shards.values())):
                sd.update(read_file(os.path.join(folder, shard)))
            return sd
    raise ValueError(f"{where} is a folder but not a Hugging Face model folder (expected model.safetensors or "
                     "pytorch_model.bin beside config.json, whole or sharded with its .index.json)")


def read_json(folder, name):
    """A folder's JSON file as a dict; {} when it is absent; ValueError, one line naming it, if it does not read."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            fields = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{path} does not read as JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} holds a JSON {type(fields).__name__}, not the object of fields a config is")
    return fields


def class_names(labels, what, notes):
    """Transformers' id2label ({"0": name, ...}) as names in class order; None, and a note, where it does not
    number the classes 0..n-1."""
    if not labels:
        return None
    if not isinstance(labels, dict) or set(labels) != {str(i) for i in range(len(labels))}:
        notes.append(f"{what} does not number the classes 0..{len(labels) - 1}: their names are not kept")
        return None
    return [str(labels[str(i)]) for i in range(len(labels))]


def said_normalization(fields, keys, source, notes):
    """mean_std() of the fields named by keys (mean, std); None, and a note saying so, where both are not known."""
    norm = mean_std(*(fields.get(k) for k in keys), source)
    if norm is None:
        said = ", ".join(f"{k} {fields[k]!r}" if k in fields else f"no {k}" for k in keys)
        notes.append(f"{source} gives {said}: their normalisation is not known")
    return norm


def mean_std(mean, std, source):
    """{'mean', 'std': three floats each, 'from': source}, from lists, "0.5,0.5,0.5" or one number for all three
    channels (as Transformers' processors take it); None unless both are given, std > 0."""
    values = []
    for v in (mean, std):
        v = v.split(",") if isinstance(v, str) else [v] * 3 if isinstance(v, (int, float)) else v
        try:
            values.append([float(x) for x in v] if isinstance(v, (list, tuple)) and len(v) == 3 else None)
        except (TypeError, ValueError):  # not numbers
            return None
    if None in values or min(values[1]) <= 0:
        return None
    return {"mean": values[0], "std": values[1], "from": source}


def load(src, overrides=None):
    """A path (file or folder), a Hub name (hf-hub:<org>/<name>[@<revision>]) or an in-memory checkpoint ->
    (format, state dict, config, extra).

    format: 'cover' (ours), 'timesformer' (official), 'huggingface' (Transformers' Timesformer) or 'vit'
    (timm's or Transformers' layout). The state dict uses our keys, a foreign classifier as heads.default.
    config holds TimeSformerConfig fields, the `overrides` applied (attention: only a ViT's is chosen, video
    weights keep theirs). extra may hold 'label_maps' {head: class names}, 'normalization' (the weights' own:
    mean_std()) and 'notes' (what was dropped or not known, and why).
    """
    where = str(src) if isinstance(src, (str, os.PathLike)) else "the checkpoint"
    hf_config, found, notes = {}, {}, []
    if isinstance(src, str) and src.startswith(HUB):
        src = hub_folder(src)
        notes.append(f"{where} from huggingface_hub's cache, {src}")
    if isinstance(src, (str, os.PathLike)):
        if os.path.isdir(src):
            src, hf_config, found = read_folder(src, where)
            notes += found["notes"]
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
        fmt = "cover (the moving average, --ema)" if sd.get("ema") else "cover"
        config = {**sd["model_config"], **check_attention("cover", sd["model_config"]["attention"], overrides)}
        run = sd.get("config") or {}
        norm = mean_std(run.get("mean"), run.get("std"), f"{where}, its run's --mean/--std")
        return fmt, state, config, {"label_maps": sd.get("label_maps"), "normalization": norm}
    if "model_state" in sd:  # official TimeSformer .pyth
        sd = sd["model_state"]
    for wrapper in ("state_dict", "model"):  # DeiT and others wrap a timm state dict
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("unknown checkpoint format: expected a state dict of tensors, an official "
                         "TimeSformer '.pyth' (with 'model_state'), a Hugging Face folder, or our ckpt.pt")
    prefix = next((p for p in ("timesformer.", "vit.", "") if p + "embeddings.cls_token" in sd), None)
    if prefix is not None:  # Transformers' layout: Timesformer, or ViT (an image model, made a video one below)
        # a Timesformer by its prefix, its config, or (a bare TimesformerModel) its temporal parts
        video = (prefix == "timesformer." or hf_config.get("model_type") == "timesformer"
                 or "embeddings.time_embeddings" in sd or any(".temporal_" in k for k in sd))
        sd, dropped = from_transformers(sd, prefix)
        notes += dropped
        fmt = "huggingface" if video else "vit"
    else:
        sd = {k.removeprefix("model."): v for k, v in sd.items()}  # PySlowFast prefixes every key
        if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
            raise ValueError(f"unknown checkpoint format (first keys: {list(sd)[:5]}); expected ImageNet "
                             "ViT weights in timm's layout, an official TimeSformer .pyth or a Hugging Face "
                             "folder")
        fmt = "timesformer" if any(".temporal_attn." in k for k in sd) or "time_embed" in sd else "vit"
    classes = found.get("classes") if "head.weight" in sd else None  # names of a classifier that came along
    if classes and len(classes) != len(sd["head.weight"]):
        notes.append(f"{where}: {len(classes)} class names for {len(sd['head.weight'])} classes: names not kept")
        classes = None
    if "head.weight" in sd:
        sd["heads.default.weight"], sd["heads.default.bias"] = sd.pop("head.weight"), sd.pop("head.bias")
    config = infer_config(sd, fmt, hf_config)
    config.update(check_attention(fmt, config["attention"], overrides))
    if config["num_heads"] is None:
        raise ValueError(f"cannot infer the number of attention heads for width {config['width']}: "
                         "pass num_heads=...")
    flatten_patch_weight(sd)
    if fmt == "vit" and config.get("attention", "divided_space_time") == "divided_space_time":
        inflate_vit(sd)
    extra = {"notes": notes} if notes else {}
    if classes:
        extra["label_maps"] = {"default": classes}
    if found.get("normalization"):
        extra["normalization"] = found["normalization"]
    return fmt, sd, config, extra


def check_attention(fmt, theirs, overrides):
    """The overrides, if they leave video weights the attention they were trained with (a ViT takes any)."""
    overrides = overrides or {}
    if fmt != "vit" and overrides.get("attention", theirs) != theirs:
        raise ValueError(f"these {fmt} weights have {theirs} attention, not {overrides['attention']}: only image "
                         "(ViT) weights take the attention asked for")
    return overrides


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
