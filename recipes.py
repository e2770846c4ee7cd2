"""
train.py's flags, the training recipes side by side, and how a command line picks one. A recipe sets the
defaults of any of the flags; a flag given on the command line wins. Naming only demo sets (or none) runs
`demo`, naming real datasets runs `cover`; a mix of both must say which with --recipe.
"""

import argparse
import importlib.util
import math
import os
import sys
from decimal import Decimal

import checkpoints
import data
import kinetics
import model as M
from runtime import DTYPES, CheckpointFiles

RECIPES = {
    # The built-in demo sets (demo.py), a small model from scratch, fp32 on a CPU in a few minutes.
    "demo": dict(datasets="demo_kinetics,demo_ssv2,demo_imagenet", weights="demo_ssv2=2", model="demo",
                 img_size=32, frames=8, batch_size=32, optimizer="adamw", lr=1e-3, min_lr=1e-5,
                 weight_decay=0.05, warmup_steps=30, max_steps=1200, eval_every=600, save_every=600,
                 val_samples=0, num_sample=1, dtype="fp32", workers=2, drop_path=0.0, mean="0.45,0.45,0.45",
                 std="0.225,0.225,0.225"),
    # CoVeR on real data, with the official TimeSformer K400 recipe where the paper gives one: SGD with
    # nesterov momentum, lr 0.005, weight decay 1e-4, global batch 64, 8x224 clips; round robin, long
    # enough that K400 gets the official 15 epochs (56,250 steps of 64 clips each dataset). In both
    # recipes one clip per decoded video (more cost accuracy per step on the demo: docs/performance.md),
    # and no mixup, cutmix, EMA or layer decay (the official recipe has none). A step takes tens of
    # milliseconds on a GPU: saving and validation go by the clock, validation on a fixed subset of each set.
    "cover": dict(datasets="k400,ssv2,in21k", weights="", model="base", img_size=224, frames=8, batch_size=64,
                  optimizer="sgd", lr=0.005, min_lr=0.0, weight_decay=1e-4, warmup_steps=1000,
                  max_steps=168_750, eval_every="30min", save_every="15min", val_samples=10_000, dtype="bf16",
                  workers=8, num_sample=1, drop_path=0.1, mean="0.45,0.45,0.45", std="0.225,0.225,0.225"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """train.py --help: the docstring's lines as written, and each flag's default, which is the recipe's."""


def parse(argv, description):
    """train.py's flags, in two passes: the first finds the recipe, whose values become the defaults of the
    second; then check()."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, add_help=False)
    a = p.add_argument
    a("--recipe", choices=list(RECIPES), help="defaults (recipes.py): demo for demo sets, else cover")
    a("--datasets", help="comma-separated: k400, k600, k700, k710 (those three as one: kinetics.py), ssv2, mit, "
                         "in1k, in21k, demo sets (demo.py), or a folder of your own in --data_dir (layouts.py)")
    a("--data_dir", default="data", help="folder holding one sub-folder per dataset")
    a("--out_dir", default="out", help="checkpoint, log.jsonl, eval.json and the dataset listings go here")
    a("--model", help="architecture preset: " + ", ".join(M.PRESETS) + " (with --init: read off the weights)")
    a("--attention", choices=M.ATTENTION_TYPES, help="TimeSformer attention; not given with --init: the weights' "
                                                     "own (a ViT's: the default)")
    a("--frames", type=int, help="frames per video clip (images are always 1)")
    a("--img_size", type=int, help="crop size in pixels, a multiple of the patch size")
    a("--init", help="starting weights: ImageNet ViT (timm .pth/.safetensors, a timm or Transformers folder), "
                     "official TimeSformer .pyth, a Transformers Timesformer folder, a ckpt.pt of this project, or "
                     "a Hub name, hf-hub:<org>/<name>[@<revision>] (pip install huggingface_hub)")
    a("--batch_size", type=int, help="global clips per optimizer step (over all processes and micro-steps)")
    a("--dataset_batch_size", default="", help="per-dataset --batch_size, e.g. in21k=256 (images: 4x, demo 2x)")
    a("--sampling", default="", help="a video set's frames, by name: mine=kinetics (a window, 1/32 at 30 fps), "
                                     "mine=kinetics:8 (1/8), mine=segment (your own sets' default)")
    a("--num_sample", help="training clips taken from each decoded video (repeated sampling), for the video "
                           "sets (images: 1) or by name (ssv2=2,in21k=2); --batch_size counts the clips")
    a("--weights", help="share of the steps per dataset: one each (2,1,1) or some by name (ssv2=2)")
    a("--max_steps", type=int, help="optimizer steps in all")
    a("--epochs", default="", help="each dataset's budget in epochs (k400=30,ssv2=20,in21k=1): --weights and "
                                   "--max_steps follow from it and the batch sizes")
    a("--lr", type=float, help="peak learning rate")
    a("--lr_factor", default="", help="the lr of a step that trains a dataset x its factor, by name (in21k=0.1)")
    a("--min_lr", type=float, help="learning rate at the end of the cosine decay")
    a("--warmup_steps", type=int, help="linear warm-up steps")
    a("--weight_decay", type=float, help="weight decay (not on biases, norms and embeddings)")
    a("--optimizer", choices=["adamw", "sgd"], help="adamw, or sgd with nesterov momentum 0.9 (the paper's)")
    a("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--clip_grad", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--label_smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    a("--mixup", default="0", help="mixup alpha (0: off), for all datasets or by name (k400=0.8,ssv2=0.8)")
    a("--cutmix", default="0", help="cutmix alpha (0: off), as --mixup; with both, each batch takes one")
    a("--ema", type=float, default=0.0, help="decay of a moving average of the weights, tested in its place")
    a("--layer_decay", type=float, default=1.0, help="layer-wise lr decay when fine-tuning, e.g. 0.75")
    a("--drop_path", type=float, help="stochastic depth at the last block")
    a("--dtype", choices=list(DTYPES), help="autocast precision (fp16 adds a GradScaler)")
    a("--compile", nargs="?", const="inductor", metavar="BACKEND",
      help="torch.compile the trunk for training (heads and evaluation stay eager); BACKEND e.g. aot_eager")
    a("--ddp", action="store_true", help="join torchrun's process group and wrap the model in DDP even for one "
                                         "process: the multi-GPU code path on one GPU (tools/selfcheck.py)")
    a("--grad_checkpoint", action="store_true", help="recompute block activations in backward (saves memory)")
    a("--mean", help="per-channel normalisation mean; not given: the weights' own (--init, or the run's "
                     "checkpoint) where their files say, else the recipe's")
    a("--std", help="per-channel normalisation std; not given: as --mean")
    a("--eval_every", type=cadence, help="validate (clip-level, 1 view) every N steps, or every M minutes of "
                                         "training (30min); 0 = only at the end")
    a("--val_samples", type=int, help="samples of each validation set that validation reads, evenly spaced, "
                                      "the same each time (0 = all); the final test reads all")
    a("--save_every", type=cadence, help="write <out_dir>/ckpt.pt every N steps, or every M minutes of training "
                                         "(15min: the clock counts over resumes)")
    a("--log_every", type=int, default=10, help="append to log.jsonl every N steps")
    a("--tensorboard", action="store_true", help="log to <out_dir>/tensorboard too (pip install tensorboard)")
    a("--wandb", metavar="PROJECT", help="log to this Weights & Biases project too (pip install wandb)")
    a("--final_eval", default="multiview", choices=["multiview", "none"], help="multi-view test at the end")
    a("--stop_at", type=int, help="save and exit at this step, on the --max_steps schedule (rerun to go on)")
    a("--resume", action="store_true", help="require a checkpoint in --out_dir (one there is used anyway)")
    a("--train_on_val_videos", action="store_true",
      help="keep the training samples that are validation videos of a dataset in --datasets (by YouTube id; "
           "left out by default): test numbers may then include training videos")
    a("--seed", type=int, default=0, help="seed for initialisation, data order and augmentation")
    a("--workers", type=int, help="DataLoader worker processes per GPU/process")
    a("--sample_time_limit", type=float, default=120.0, help="seconds a loader worker may read one sample; "
      "longer, it is ended, the sample quarantined and the loader started again (docs/cluster.md)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    known, _ = p.parse_known_args(argv)  # which recipe, then its values as the defaults of a second parse
    recipe = known.recipe or pick(known.datasets)
    p.set_defaults(recipe=recipe, attention="divided_space_time", **RECIPES[recipe])
    a("-h", "--help", action="help", help=f"show this help; the defaults shown are the {recipe} recipe's")
    args = p.parse_args(argv)
    for flag in ("mean", "std"):  # None: not given, decided by normalization() once the weights are read
        if getattr(known, flag) is None:
            setattr(args, flag, None)
    if args.init and known.attention is None:  # None: the weights' own, read by train.build_model
        args.attention = None
    if args.epochs:  # --max_steps and --weights follow from the budgets; None: not typed (budgets)
        for flag in ("max_steps", "weights"):
            if getattr(known, flag) is None:
                setattr(args, flag, None)
    check(args)
    return args


def cadence(text):
    """--save_every / --eval_every: a whole number of steps (an int), or minutes as 'Mmin', the exact number typed,
    never rounded (1e3min: 1000min); 0 and 0min alike are never (--eval_every: only at the end; --save_every
    refuses it). One line of error for anything else, and for minutes whose period in seconds is 0 or infinite."""
    if text.endswith("min"):
        minutes = number(text.removesuffix("min"), Decimal)  # exact: 15.0000001 stays itself
        if minutes is not None and minutes.is_finite() and (minutes == 0 or 0 < 60 * float(minutes) < math.inf):
            return 0 if minutes == 0 else f"{minutes.normalize():f}min"
    else:
        steps = number(text, int)
        if steps is not None and steps >= 0:
            return steps
    raise argparse.ArgumentTypeError(f"{text!r}: say a whole number of steps (1000) or of minutes (15min, 0.5min), "
                                     "0 for never")


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
    if "k710" in names and set(names) & set(kinetics.VERSIONS):
        errors.append(f"--datasets {args.datasets}: k710 holds {', '.join(sorted(set(names) & set(kinetics.VERSIONS)))}"
                      " already; name k710 or the versions, not both")
    if args.init is None and args.model not in M.PRESETS:
        errors.append(f"--model {args.model!r} is not a preset; choose one of {', '.join(M.PRESETS)}")
    patch = M.PRESETS.get(args.model, {}).get("patch_size", 16)
    if args.frames < 1:
        errors.append(f"--frames must be >= 1 (got {args.frames})")
    if args.img_size < 1 or (args.init is None and args.img_size % patch):
        errors.append(f"--img_size {args.img_size} must be a positive multiple of the patch size {patch}")
    for flag, kind, least in (("dataset_batch_size", int, 1), ("num_sample", int, 1), ("mixup", float, 0),
                              ("cutmix", float, 0)):
        try:
            if any(v < least for v in per_dataset(args, flag, kind).values()):
                wanted = "whole numbers >= 1" if least else "numbers >= 0"
                errors.append(f"--{flag} {getattr(args, flag)}: {wanted}")
        except ValueError as e:
            errors.append(str(e))
    try:
        epochs = per_dataset(args, "epochs", float)
        if not all(0 < v < math.inf for v in epochs.values()):
            errors.append(f"--epochs {args.epochs}: each dataset's budget must be a number of epochs > 0")
        if epochs and set(epochs) != set(names):
            errors.append(f"--epochs {args.epochs}: give every dataset in --datasets its epochs (one number for "
                          f"all, or name=epochs for {', '.join(n for n in names if n not in epochs)} too)")
        if not all(0 < v < math.inf for v in per_dataset(args, "lr_factor", float).values()):
            errors.append(f"--lr_factor {args.lr_factor}: each factor must be a number > 0")
    except ValueError as e:
        errors.append(str(e))
    try:
        weights = dataset_weights(args, names)
        idle, enough = ([], None) if args.epochs else idle_datasets(args, names, weights)  # epochs: steps each
        if idle:
            errors.append(f"--weights {args.weights}: {', '.join(idle)} would get no step in --max_steps "
                          f"{args.max_steps}; " + (f"give --max_steps {enough} or more, or raise the weight" if enough
                                                   else "raise the weight"))
        for n in names:
            sampling(args, n)
    except ValueError as e:
        errors.append(str(e))
    for flag, value in vars(args).items():  # nan and inf would pass the comparisons here and fail later
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"--{flag} {value}: a finite number expected")
    for package in ("tensorboard", "wandb"):  # opt-in extras, imported only when asked for
        if getattr(args, package) and importlib.util.find_spec(package) is None:
            errors.append(f"--{package} needs the {package} package: pip install {package}")
    if not 0 <= args.ema < 1 or not 0 < args.layer_decay <= 1:
        errors.append(f"--ema {args.ema} must lie in [0, 1) (0: off), --layer_decay {args.layer_decay} "
                      "in (0, 1] (1: off)")
    if args.save_every == 0 or args.val_samples < 0:
        errors.append(f"--save_every {args.save_every} must be >= 1 (steps) or minutes (15min), --val_samples "
                      f"{args.val_samples} >= 0 (0: all)")
    if not 0 < args.sample_time_limit <= 300:  # a rank's recovery must end before NCCL's 10-minute timeout
        errors.append(f"--sample_time_limit {args.sample_time_limit:g}: seconds in (0, 300]: under DDP the other "
                      "ranks wait for a stuck one in a collective that NCCL ends after 600 s (docs/cluster.md)")
    if args.resume and not CheckpointFiles(os.path.join(args.out_dir, "ckpt.pt")).any():
        errors.append(f"--resume: no checkpoint in {args.out_dir}; drop --resume or name the run's --out_dir")
    hub = args.init and args.init.startswith(checkpoints.HUB)
    if hub and importlib.util.find_spec("huggingface_hub") is None:
        errors.append(f"--init {args.init}: a Hub name needs the huggingface_hub package: pip install huggingface_hub")
    if args.init and not hub and not os.path.exists(args.init):
        errors.append(f"--init: no file or folder at {args.init}")
    for flag in ("mean", "std"):
        given = getattr(args, flag)
        values = floats(given) if given is not None else [1.0] * 3
        if values is None or len(values) != 3 or (flag == "std" and min(values) <= 0):
            errors.append(f"--{flag} {given}: three numbers, one per RGB channel (std > 0)")
    if errors:
        sys.exit("error: " + "\nerror: ".join(errors))


def normalization(args, own, verbose=True, resumed=False):
    """The run's mean and std as flag values: each --mean / --std as given, else the weights' own (own:
    {'mean', 'std', 'from'} from their files, or None), else the recipe's. With verbose, a line saying which
    and from where, after a warning for a given value that differs from the weights' own. resumed: own is the
    run's, fixed for its life, and a given value that differs is one line of error."""
    values, sources = [], []
    for flag in ("mean", "std"):
        given = getattr(args, flag)
        if given is not None and resumed and own and floats(given) != own[flag]:
            sys.exit(f"error: --{flag} {given}: the run in {args.out_dir} trained with --{flag} "
                     f"{as_flag(own[flag])}, which it keeps for its life; drop --{flag} or use a new --out_dir")
        if given is not None:
            values.append(given)
            sources.append(f"--{flag}")
            if own and floats(given) != own[flag] and verbose:
                print(f"warning: --{flag} {given} differs from the weights' own {as_flag(own[flag])} "
                      f"({own['from']}); using --{flag}")
        elif own:
            values.append(as_flag(own[flag]))
            sources.append(f"the weights' own ({own['from']})")
        else:
            values.append(RECIPES[args.recipe][flag])
            sources.append(f"the {args.recipe} recipe's")
    if verbose and sources[0] == sources[1]:
        print(f"normalisation: mean {values[0]}, std {values[1]}: {sources[0]}")
    elif verbose:
        print(f"normalisation: mean {values[0]} ({sources[0]}), std {values[1]} ({sources[1]})")
    return values


def floats(text):  # "0.5,0.5,0.5" -> [0.5, 0.5, 0.5]; None where it is not finite numbers
    values = [number(v, float) for v in text.split(",")]
    return None if None in values or not all(map(math.isfinite, values)) else values


def as_flag(values):  # [0.5, 0.5, 0.5] -> "0.5,0.5,0.5", every digit kept
    return ",".join(str(v) for v in values)


def per_dataset(args, flag, kind=str):
    """{dataset: value} for the datasets that the per-dataset flag --<flag> gives, each flag parsed here: one
    value for all ('0.8'), one per dataset in --datasets order ('2,1,1'), or some by name ('ssv2=2,in21k=4').
    ValueError, one line naming the flag, for a name not in --datasets, a wrong count or a wrong value."""
    names, text = args.datasets.split(","), str(getattr(args, flag) or "")
    items = [s for s in text.split(",") if s]
    if all("=" in s for s in items):
        pairs = [s.split("=", 1) for s in items]
    elif len(items) == 1 and "=" not in text:
        pairs = [(n, text) for n in names]
    elif len(items) == len(names) and "=" not in text:
        pairs = list(zip(names, items))
    else:
        raise ValueError(f"--{flag} {text}: one value, one per dataset ({len(names)}), or name=value pairs")
    if any(n not in names for n, _ in pairs) and text != str(RECIPES[args.recipe].get(flag)):
        raise ValueError(f"--{flag} {text}: a name not in --datasets ({args.datasets})")
    given = [n for n, _ in pairs]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ValueError(f"--{flag} {text}: {', '.join(twice)} given twice")
    pairs = [(n, v) for n, v in pairs if n in names]  # the recipe's value may name sets this run leaves out
    values = {n: number(v, kind) if kind in (int, float) else v for n, v in pairs}
    if any(v is None for v in values.values()):
        raise ValueError(f"--{flag} {text}: {'whole numbers' if kind is int else 'numbers'} expected")
    if kind is float and not all(map(math.isfinite, values.values())):
        raise ValueError(f"--{flag} {text}: finite numbers expected")
    return values


def number(text, kind):  # None where `text` is not a number of that kind
    try:
        return kind(text)
    except (ValueError, ArithmeticError):  # Decimal's InvalidOperation is an ArithmeticError
        return None


def dataset_weights(args, names):
    """The schedule's weight of each dataset: --weights (2,1,1 or ssv2=2), else 1."""
    given = per_dataset(args, "weights", float)
    weights = [given.get(n, 1.0) for n in names]
    if min(weights) <= 0:
        raise ValueError(f"--weights {args.weights}: each dataset's weight must be positive")
    return weights


def budgets(args, names, train_sets, local_batch, num_sample, world):
    """(the schedule's weights, --max_steps): as given, or from --epochs: a dataset's steps are its epochs x
    its samples / the samples of its global batch (a sample's R clips count once), the weights those steps,
    max_steps their sum; the schedule then gives each dataset exactly its steps (data.integer_ratio). Beside
    --epochs, a --weights or --max_steps typed on the command line (parse: None if not) that says otherwise
    is an error (one line); not typed, --weights becomes the steps, as the run's config records."""
    weights = dataset_weights(args, names)
    if not args.epochs:
        return weights, args.max_steps
    epochs = per_dataset(args, "epochs", float)
    steps = [max(1, round(epochs[n] * len(ds) * num_sample[n] / (local_batch[n] * world * args.grad_accum)))
             for n, ds in zip(names, train_sets)]
    if args.max_steps is not None and args.max_steps != sum(steps):
        sys.exit(f"error: --epochs {args.epochs} makes {sum(steps)} steps in all, not --max_steps {args.max_steps}: "
                 "drop one of the two")
    if args.weights is not None and any(abs(w / sum(weights) - s / sum(steps)) > 0.01 * s / sum(steps)
                                        for w, s in zip(weights, steps)):
        sys.exit(f"error: --epochs {args.epochs} makes the steps {dict(zip(names, steps))}, not in the ratio of "
                 f"--weights {args.weights}: drop one of the two")
    args.weights = args.weights or ",".join(f"{n}={s}" for n, s in zip(names, steps))
    return [float(s) for s in steps], sum(steps)


def idle_datasets(args, names, weights):
    """A run of at least one step per dataset trains each one (data.schedule makes the weights small integers,
    and a tiny one becomes 0); a shorter run, a smoke test, may leave some out, whatever the weights. -> (the
    datasets left out of the run, the smallest --max_steps that gives each a step, or None where none does)."""
    if args.max_steps < len(names):
        return [], None
    firsts = [int(s[0]) if len(s) else None for s in data.steps_of(tuple(float(w) for w in weights))]
    idle = [n for n, first in zip(names, firsts) if first is None or first >= args.max_steps]
    return idle, None if None in firsts else max(firsts) + 1


def num_sample(args, name, kind):
    """Training clips taken from one decoded sample of dataset `name`: --num_sample as one number for the
    videos (images take 1), one per dataset or by name (ssv2=2,in21k=2; the others 1)."""
    text = str(args.num_sample)
    if kind != "video" and "=" not in text and "," not in text:
        return 1
    return per_dataset(args, "num_sample", int).get(name, 1)


def mixing(args, name):
    """(mixup alpha, cutmix alpha) of dataset `name`: each flag one number for all or by name (k400=0.8)."""
    return per_dataset(args, "mixup", float).get(name, 0.0), per_dataset(args, "cutmix", float).get(name, 0.0)


def sampling(args, name):
    """How dataset `name` samples frames if --sampling says (mine=kinetics, mine=kinetics:8 for rate 8,
    mine=segment): the spec fields to change, {'sampling': 'kinetics', 'rate': 8}; else {}. A Kinetics version
    tested through a k710 head samples as k710 trained."""
    names = args.datasets.split(",")
    if name in kinetics.VERSIONS and name not in names and "k710" in names:
        name = "k710"
    value = per_dataset(args, "sampling").get(name)
    if value is None:
        return {}
    if value in ("kinetics", "segment"):
        return {"sampling": value}
    rate = number(value.removeprefix("kinetics:"), int) if value.startswith("kinetics:") else None
    if rate is None or rate < 1:
        raise ValueError(f"--sampling {args.sampling}: {name}={value}: say kinetics, kinetics:RATE or segment")
    return {"sampling": "kinetics", "rate": rate}


def local_batch_sizes(args, names, train_sets, world, num_sample):
    """{dataset: clips per micro-batch of one process}: the global batch, --batch_size (x the spec's
    batch_scale for images, 4 for ImageNet) unless --dataset_batch_size says, split over the processes and
    the --grad_accum micro-steps; each a whole number of samples of --num_sample clips."""
    given, parts = per_dataset(args, "dataset_batch_size", int), world * args.grad_accum
    sizes = {n: given.get(n, args.batch_size * ds.spec.batch_scale) for n, ds in zip(names, train_sets)}
    if any(b % (parts * num_sample[n]) for n, b in sizes.items()):
        sys.exit(f"error: batch sizes {sizes} must be multiples of {parts} (processes x --grad_accum) x "
                 f"--num_sample {num_sample}: a sample's clips stay in one micro-batch")
    return {n: b // parts for n, b in sizes.items()}
