"""
The training recipes, side by side, and how a command line picks one. A recipe sets the defaults of any of
train.py's flags; a flag given on the command line wins. Naming only demo sets (or none) runs `demo`,
naming real datasets runs `cover`; a mix of both must say which with --recipe.
"""

import os
import sys

import model as M

RECIPES = {
    # The built-in demo sets (demo.py), a small model from scratch, fp32 on a CPU in a few minutes.
    "demo": dict(datasets="demo_kinetics,demo_ssv2,demo_imagenet", weights="demo_ssv2=2", model="demo",
                 img_size=32, frames=8, batch_size=32, optimizer="adamw", lr=1e-3, min_lr=1e-5,
                 weight_decay=0.05, warmup_steps=30, max_steps=1200, eval_every=600, save_every=600,
                 num_sample=1, dtype="fp32", workers=2, drop_path=0.0, mean="0.45,0.45,0.45",
                 std="0.225,0.225,0.225"),
    # CoVeR on real data, with the official TimeSformer K400 recipe where the paper gives one: SGD with
    # nesterov momentum, lr 0.005, weight decay 1e-4, global batch 64, 8x224 clips; round robin, long
    # enough that K400 gets the official 15 epochs (56,250 steps of 64 clips each dataset).
    "cover": dict(datasets="k400,ssv2,in21k", weights="", model="base", img_size=224, frames=8, batch_size=64,
                  optimizer="sgd", lr=0.005, min_lr=0.0, weight_decay=1e-4, warmup_steps=1000,
                  max_steps=168_750, eval_every=5000, save_every=1000, dtype="bf16", workers=8, num_sample=1,
                  drop_path=0.1, mean="0.45,0.45,0.45", std="0.225,0.225,0.225"),
}


def pick(datasets):
    """demo for the built-in demo sets (or none named), cover for real data; a mix must say which."""
    names = datasets.split(",") if datasets else []
    demos = [n for n in names if n.startswith("demo_")]
    if len(demos) == len(names):
        return "demo"
    if not demos:
        return "cover"
    sys.exit(f"error: --datasets mixes demo sets ({','.join(demos)}) and real ones "
             f"({','.join(n for n in names if n not in demos)}): pass --recipe demo or --recipe cover")


def check(args):
    """Fail before any heavy work, with one line per problem that names the fix."""
    names = args.datasets.split(",")
    errors = []
    if len(set(names)) != len(names):
        errors.append(f"--datasets lists a dataset twice: {args.datasets}")
    if args.init is None and args.model not in M.PRESETS:
        errors.append(f"--model {args.model!r} is not a preset; choose one of {', '.join(M.PRESETS)}")
    patch = M.PRESETS.get(args.model, {}).get("patch_size", 16)
    if args.frames < 1:
        errors.append(f"--frames must be >= 1 (got {args.frames})")
    if args.img_size < 1 or (args.init is None and args.img_size % patch):
        errors.append(f"--img_size {args.img_size} must be a positive multiple of the patch size {patch}")
    try:
        dataset_weights(args, names)
    except ValueError as e:
        errors.append(f"--weights: {e}")
    for flag in ("dataset_batch_size", "num_sample"):
        text = str(getattr(args, flag))
        plain = flag == "num_sample" and "=" not in text  # one number for all: --num_sample only
        pairs = [] if plain else [kv.split("=") for kv in text.split(",") if kv]
        if any(len(kv) != 2 or kv[0] not in names for kv in pairs):
            errors.append(f"--{flag} {text}: a name not in --datasets, or not name=value pairs")
        elif not all(v.isdigit() and int(v) >= 1 for v in ([text] if plain else [kv[1] for kv in pairs])):
            errors.append(f"--{flag} {text}: whole numbers >= 1")
    if args.resume and not os.path.exists(os.path.join(args.out_dir, "ckpt.pt")):
        errors.append(f"--resume: no checkpoint in {args.out_dir}; drop --resume or name the run's --out_dir")
    if args.init and not os.path.exists(args.init):
        errors.append(f"--init: no file or folder at {args.init}")
    if errors:
        sys.exit("error: " + "\nerror: ".join(errors))


def num_sample(args, name, kind):
    """Training clips taken from one decoded sample of dataset `name`: --num_sample as one number (for
    videos; images take 1) or by name (ssv2=2,in21k=2; the others 1)."""
    text = str(args.num_sample)
    if "=" in text:
        return int(per_dataset(text).get(name, 1))
    return int(text) if kind == "video" else 1


def per_dataset(text):  # 'in21k=256,ssv2=32' -> {'in21k': '256', 'ssv2': '32'}
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


def dataset_weights(args, names):
    """The schedule's weight of each dataset: --weights as a list (2,1,1) or by name (ssv2=2), else 1."""
    if "=" in (args.weights or ""):
        weights = [float(per_dataset(args.weights).get(n, 1)) for n in names]
    else:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(names)
    if len(weights) != len(names) or min(weights) <= 0:
        raise ValueError(f"need one positive weight per dataset ({len(names)}), got {args.weights!r}")
    return weights
