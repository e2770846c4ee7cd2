"""
One head of a checkpoint of train.py as a Hugging Face Transformers folder, which
transformers.TimesformerForVideoClassification.from_pretrained loads to the same logits as ours: config.json
(the head's class names as id2label, image size, frames), the weights (model.safetensors; without the
safetensors package, pytorch_model.bin) and preprocessor_config.json with the run's normalisation and the test
view eval.py takes. The head of an image dataset exports as a 1-frame model, tested on the ImageNet centre crop.
Our own --init reads the folder back. The keys are checkpoints.py's tables read backwards. Divided and joint
space-time attention export (Transformers' Timesformer computes them as we do), space_only does not.

    python tools/export.py --ckpt out/ckpt.pt --head k400 --out k400_hf/
    hf upload <you>/cover-k400 k400_hf/             # share it on the Hub (hf auth login first; an older
                                                    # huggingface_hub: huggingface-cli upload, huggingface-cli login)

The weights are the moving average when the run kept one (--ema), as eval.py tests; --live: the live ones.
"""

import argparse
import json
import os
import sys

# the project's modules are in the folder above, which is not on the path when this runs as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402, F401  (registers the demo sets)
import model as M  # noqa: E402
import runtime  # noqa: E402

# Transformers' Timesformer computes these as we do; its space_only gives one logit row per frame
EXPORTED = ("divided_space_time", "joint_space_time")
TOP = {ours: theirs for theirs, ours in checkpoints.HF_TOP.items()}
LAYER = {ours: theirs for theirs, ours in checkpoints.HF_LAYER.items()}


def transformers_key(key):
    """Our key -> Transformers Timesformer's (heads.<any>.* is the classifier)."""
    prefix = checkpoints.HF_PREFIXES["timesformer"]
    if key in TOP:
        return prefix + TOP[key]
    module, param = key.rsplit(".", 1)
    if module in TOP:
        return f"{prefix}{TOP[module]}.{param}"
    if module.startswith("heads."):
        return f"{checkpoints.HF_HEAD}.{param}"
    _, i, rest = module.split(".", 2)  # blocks, i, rest
    return f"{prefix}encoder.layer.{i}.{LAYER[rest]}.{param}"


def read_run(path, live):
    """-> (the run's config, label maps, our state dict, model config) of a ckpt.pt; ValueError, one line."""
    ckpt = checkpoints.read_file(path)
    runtime.check_run_checkpoint(ckpt, path)
    if live:
        ckpt.pop("ema", None)
    _, sd, model_config, _ = checkpoints.load(ckpt)
    return ckpt["config"], ckpt["label_maps"], sd, model_config


def is_image_head(name, run, ckpt_path):
    """Whether a head was trained on images (1-frame clips), as eval.py tests it: its dataset's spec, which for a
    folder of one's own comes from the files the run listed (beside ckpt.pt), else from the folder itself.
    DatasetError where neither is there."""
    if name in data.SPECS:
        return data.SPECS[name].kind == "image"
    file = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "listings", f"{name}-train")  # train.py's
    cached = os.path.exists(file + ".json")
    samples = data.Listing.load(file) if cached else data.listing(name, run["data_dir"], "train", "custom")
    return data.custom_spec(name, samples.paths).kind == "image"


def transformers_state(sd, head, cfg, frames):
    """The trunk and one head in Transformers' keys and shapes (the patch embedding back to a Conv2d weight),
    time_embed for `frames` frames as our model resizes it."""
    out = {}
    for key, value in sd.items():
        if key.startswith("heads.") and not key.startswith(f"heads.{head}."):
            continue
        if key == "patch_embed.proj.weight":  # (D, C*p*p) -> (D, C, p, p)
            value = value.reshape(cfg["width"], cfg["in_chans"], cfg["patch_size"], cfg["patch_size"])
        if key == "time_embed":  # Transformers' layers take exactly config.num_frames frames
            value = M.resize_time_embed(value, frames)
        out[transformers_key(key)] = value.float().contiguous()
    return out


def transformers_config(cfg, classes, frames):
    """config.json of TimesformerForVideoClassification for our model config and one head's classes."""
    return {"architectures": ["TimesformerForVideoClassification"], "model_type": "timesformer",
            "image_size": cfg["img_size"], "patch_size": cfg["patch_size"], "num_channels": cfg["in_chans"],
            "num_frames": frames, "hidden_size": cfg["width"], "num_hidden_layers": cfg["depth"],
            "num_attention_heads": cfg["num_heads"], "intermediate_size": int(cfg["width"] * cfg["mlp_ratio"]),
            "hidden_act": "gelu", "layer_norm_eps": cfg["eps"], "qkv_bias": cfg["qkv_bias"],
            "attention_type": cfg["attention"], "hidden_dropout_prob": 0.0,  # no drop_path_rate: theirs is an int
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "id2label": {str(i): c for i, c in enumerate(classes)}, "label2id": {c: i for i, c in enumerate(classes)}}


def preprocessor_config(run, img_size, image):
    """The test view of eval.py (short side to img_size, for images the ImageNet img_size*256/224; centre crop)
    and the run's normalisation, in the image processor Transformers' Timesformer checkpoints use."""
    short_side = round(img_size * 256 / 224) if image else img_size  # as video.eval_image_box
    return {"image_processor_type": "VideoMAEImageProcessor", "do_resize": True, "size": {"shortest_edge": short_side},
            "resample": 2, "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [float(v) for v in run["mean"].split(",")],
            "image_std": [float(v) for v in run["std"].split(",")]}


def write_weights(state, out):
    """model.safetensors, or pytorch_model.bin where the safetensors package is missing -> what was written.
    The other file goes: Transformers would read a stale model.safetensors before a new pytorch_model.bin."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    name = "model.safetensors" if save_file else "pytorch_model.bin"
    for old in {"model.safetensors", "pytorch_model.bin"} - {name}:
        if os.path.exists(os.path.join(out, old)):
            os.remove(os.path.join(out, old))
    if save_file:
        save_file(state, os.path.join(out, name), metadata={"format": "pt"})
        return name
    torch.save(state, os.path.join(out, name))
    return f"{name} (pip install safetensors for model.safetensors)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt written by train.py")
    p.add_argument("--head", help="which dataset's head (default: the only one)")
    p.add_argument("--out", required=True, help="the folder to write (made if missing)")
    p.add_argument("--live", action="store_true", help="the live weights, not their moving average (--ema)")
    args = p.parse_args(argv)
    try:
        run, label_maps, sd, cfg = read_run(args.ckpt, args.live)
    except ValueError as e:
        sys.exit(f"error: --ckpt {e}")
    if args.head is None and len(label_maps) > 1:
        sys.exit(f"error: {args.ckpt} has heads {', '.join(label_maps)}: say which with --head")
    head = args.head or next(iter(label_maps))
    if head not in label_maps:
        sys.exit(f"error: {args.ckpt} has no head {head!r}; it has {', '.join(label_maps)}")
    if cfg["attention"] not in EXPORTED:
        sys.exit(f"error: {args.ckpt} has {cfg['attention']} attention; Transformers' Timesformer computes "
                 f"{' and '.join(EXPORTED)} as we do, not that")
    if os.path.isfile(args.out):
        sys.exit(f"error: --out {args.out} is a file; name a folder")
    try:
        image = is_image_head(head, run, args.ckpt)
    except data.DatasetError as e:
        why = str(e).partition("\n")[0]
        sys.exit(f"error: cannot tell whether head {head} was trained on videos or images: {why}")
    frames = 1 if image else cfg["frames"]
    os.makedirs(args.out, exist_ok=True)
    for name, content in (("config.json", transformers_config(cfg, label_maps[head], frames)),
                          ("preprocessor_config.json", preprocessor_config(run, cfg["img_size"], image))):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(content, f, indent=2)
    weights = write_weights(transformers_state(sd, head, cfg, frames), args.out)
    print(f"wrote {args.out}: config.json ({len(label_maps[head])} classes of {head}, "
          f"{'images' if image else f'{frames} frames'} of {cfg['img_size']}x{cfg['img_size']}), "
          f"preprocessor_config.json (mean {run['mean']}, std {run['std']}), {weights}")


if __name__ == "__main__":
    main()
