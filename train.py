"""
CoVeR co-training: one TimeSformer trunk, one classification head per dataset, and a schedule that gives
each optimizer step to one dataset; images train as single-frame videos.

    python train.py                                       # the demo: built-in data, CPU, minutes
    python train.py --datasets demo_ssv2                  # the demo recipe on one demo set
    torchrun --nproc_per_node=8 train.py --datasets k400,ssv2,in21k \\
        --init hf-hub:google/vit-base-patch16-224-in21k   # the cover recipe on real data

Naming only demo sets (or none) runs the `demo` recipe, real ones `cover` (recipes.py); flags given win.
The same command again continues from <out_dir>/ckpt.pt (also after SIGTERM / preemption).
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import data
import demo
import loaders
import model as M
import recipes
import runtime
from eval import k710_versions, test_all, test_heads


def get_args(argv=None):
    """The flags (recipes.py): the recipe's values as defaults, checked before any heavy work."""
    return recipes.parse(argv, __doc__)


def get_lr(step, args):
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def main(argv=None):
    args = get_args(argv)
    rt = runtime.setup(args.device, ddp=args.ddp)
    error = None
    try:
        train(args, rt)
    except SystemExit as e:  # leave the process group below, once train's DDP wrapper is gone
        error = e.code
    runtime.teardown(rt)
    if error:
        sys.exit(error)


def train(args, rt):
    names, device, dtype = args.datasets.split(","), rt.device, runtime.DTYPES[args.dtype]
    os.makedirs(args.out_dir, exist_ok=True)
    files = runtime.CheckpointFiles(os.path.join(args.out_dir, "ckpt.pt"))  # and the one before, ckpt.prev.pt

    # ---- data: rank 0 lists each dataset once, into out_dir/listings; the other ranks read its listings.
    # No validation video in training: a training sample that is one (by YouTube id) is left out.
    val_sets = runtime.rank0_first(rt, open_datasets, args, names, "val", (1, 1))
    train_sets = runtime.rank0_first(rt, open_datasets, args, names, "train", guard=val_sets)
    label_maps = {n: ds.classes for n, ds in zip(names, train_sets)}
    args.k710_versions = k710_versions(names, train_sets)  # in ckpt.pt: the versions tested on its head
    num_sample = {n: recipes.num_sample(args, n, ds.spec.kind) for n, ds in zip(names, train_sets)}
    local_batch = recipes.local_batch_sizes(args, names, train_sets, rt.world, num_sample)  # per micro-batch
    weights, args.max_steps = recipes.budgets(args, names, train_sets, local_batch, num_sample, rt.world)
    lr_factor = {n: recipes.per_dataset(args, "lr_factor", float).get(n, 1.0) for n in names}

    # ---- model and optimizer: the run's checkpoint > --init > scratch
    ckpt, ckpt_path = runtime.resume_on_every_rank(rt, files)  # rank 0's choice: the newest that reads
    model, source = build_model(args, {n: len(c) for n, c in label_maps.items()}, ckpt, ckpt_path, rt)
    # kept in ckpt.pt; a resumed run's are its own
    args.mean, args.std = recipes.normalization(args, model.normalization, rt.master, resumed=ckpt is not None)
    groups = model.param_groups(args.weight_decay, args.layer_decay)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = ema_copy(model) if args.ema else None  # a moving average of the weights, kept beside them
    step, seconds, failures = 0, 0.0, runtime.Failures(names, rt.rank)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, seconds = ckpt["step"], ckpt.get("clock", 0.0)  # the run's clock: seconds of training so far
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        failures.restore(ckpt)  # the counts of failed and dropped samples and of blank steps
        del ckpt
    if args.compile:  # a graph for each dataset's full batch; one that lost samples runs the plain trunk
        model.compile_trunk({(local_batch[n], 3, ds.frames, args.img_size, args.img_size)
                             for n, ds in zip(names, train_sets)}, backend=args.compile)
    # Each step trains one head, the same on all ranks; the others get no gradient (their .grad stays
    # None, so neither the optimizer nor weight decay moves them).
    wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=len(names) > 1) if rt.distributed else model
    # the batches; a loader worker that dies or sticks costs a restart, and its sample is quarantined
    sigterm = threading.Event()  # preemption: finish the step, save, exit 0 on every rank
    batches = loaders.TrainBatches(train_sets, names, [local_batch[n] for n in names], weights=weights,
                                   num_sample=[num_sample[n] for n in names], grad_accum=args.grad_accum,
                                   rank=rt.rank, world=rt.world, seed=args.seed, workers=args.workers,
                                   start_micro=step * args.grad_accum, pin_memory=device.type == "cuda",
                                   out_dir=args.out_dir, time_limit=args.sample_time_limit, stopping=sigterm)
    normalize = data.Normalize(args.mean, args.std, device)
    mixing = {n: recipes.mixing(args, n) for n in names}  # (mixup, cutmix) alphas
    smoothing = {n: 0.0 if any(mixing[n]) else args.label_smoothing for n in names}  # mixed targets have it
    tested, which = (ema, "ema") if ema else (model, "live")  # the weights validated and tested
    ema_params = list(ema.parameters()) if ema else None
    model_params = [p.detach() for p in model.parameters()] if ema else None  # detached: no graph to build
    test_kw = dict(batch_sizes=local_batch, normalize=normalize, device=device, dtype=dtype, rank=rt.rank,
                   world=rt.world, workers=args.workers)
    peak = runtime.peak_flops(device, dtype)
    flops = {n: 6 * model.flops(ds.frames, args.img_size) for n, ds in zip(names, train_sets)}  # per clip
    recipe = {k: v for k, v in recipes.RECIPES[args.recipe].items() if k not in ("mean", "std")}  # their own line
    runtime.report(args, recipe, model, source, rt, peak, names, train_sets, val_sets, local_batch, num_sample,
                   weights)

    # ---- the training loop
    signal.signal(signal.SIGTERM, lambda *_: sigterm.set())
    log = runtime.RunLog(args.out_dir, rt.master, args)
    log.write({"step": step, "guard": runtime.guard_record(args, names, train_sets)})
    meter, loss_ema = runtime.Meter(), {}
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.master, dynamic_ncols=True)
    # a step's loss, flags and the run's clock, read a step late; quarantines shared as read (the loader restarted)
    late = runtime.StepValues(rt, seconds, shared=batches.share_and_restart)
    since = seconds  # the run's clock at the last decisions to validate and save
    wrapped.train()
    while step < args.max_steps:
        if step == args.stop_at or late.stop or late.halt:  # or SIGTERM, or a halt, on any rank (read with a step)
            settle(late.read(everything=True), loss_ema, failures, weights, names, args, bar)  # nothing unread saved
            save_checkpoint(files, step, model, ema, optimizer, scaler, failures, label_maps, args, rt, late.clock)
            break
        d = data.schedule(step, weights)  # the dataset this step trains: CoVeR's one decision
        name = names[d]
        # drop path draws from torch's RNG: seeded per step and rank, so a resumed run draws the same
        torch.manual_seed(args.seed + 1_000_003 * (rt.rank + 1) + step)
        lr = get_lr(step, args) * lr_factor[name]  # x the factor of the step's dataset (--lr_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # < 1 for lower layers under --layer_decay
        step_loss = torch.zeros((), device=device)
        blank = True  # whether every sample of this rank's step was dropped
        for micro in range(args.grad_accum):
            with meter.waiting():
                batch = next(batches)
            if batch["dataset"] != d:  # one schedule: the sampler's must be the loop's (an int: no GPU sync)
                sys.exit(f"error: step {step}: the loop trains {name}, the batch is {names[batch['dataset']]}")
            failures.add(name, batch["failed"], batch["dropped"])
            blank = blank and batch["blank"]
            x = normalize(batch["x"].to(device, non_blocking=True))  # (B, C, T, H, W) float
            y = batch["y"].to(device, non_blocking=True)
            # mixup / cutmix where on: soft targets, smoothing included, drawn per step (resume is exact)
            x, y = data.mix(x, y, len(label_maps[name]), *mixing[name], args.label_smoothing,
                            np.random.default_rng([args.seed, step, micro, rt.rank]))
            # forward through the shared trunk and this dataset's head, backward (DDP syncs on the last)
            last = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last or not rt.distributed else wrapped.no_sync():
                with runtime.autocast(device, dtype):
                    logits = wrapped(x, head=name)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing[name])
                loss = loss * 0 if batch["blank"] else loss  # no sample left: no gradient, yet in DDP's backward
                scaler.scale(loss / args.grad_accum).backward()
            step_loss += loss.detach() / args.grad_accum
            meter.count(x.shape[0] * rt.world, flops[name] * x.shape[0] * rt.world)
        # over the ranks: loss, SIGTERM, a sample kept, samples quarantined, a stop with an error (the loader
        # gave up, log.jsonl is refused)
        halt = bool(batches.failed or log.failed)
        late.send(step, d, step_loss, stop=sigterm.is_set(), kept=not blank, quarantined=bool(batches.new), halt=halt)
        # clip the gradient, step the optimizer
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # the moving average follows every optimizer step
            torch._foreach_lerp_(ema_params, model_params, 1 - args.ema)
        step += 1

        # what this step does, alike on every rank: by the step count, and by the run's clock as last read
        logs = step % args.log_every == 0 or step == args.max_steps
        validates = runtime.due(args.eval_every, step, since, late.clock) and step < args.max_steps  # last: the test
        saves = runtime.due(args.save_every, step, since, late.clock) or step == args.max_steps
        since = late.clock
        # the step before's values; this step's too if it logs, validates or saves (settle: its loss is finite)
        settle(late.read(everything=logs or validates or saves), loss_ema, failures, weights, names, args, bar)
        if logs:
            record = {"step": step, "lr": lr, **meter.read(peak * rt.world),
                      "loss": {n: round(v, 4) for n, v in loss_ema.items()}, **failures.totals(rt),
                      **(runtime.compile_counts() if args.compile else {})}  # graphs, recompiles, graph breaks
            bar.set_postfix_str(" ".join(f"{n}:{v:.3f}" for n, v in loss_ema.items()) + " | "
                                f"{record['clips_per_s']:.0f} clips/s, data {record['data_wait']:.0%}, "
                                f"MFU {record['mfu']:.1%}")
            log.write(record)
        bar.update(1)
        if validates:  # a fixed subset of each set
            val = test_all(tested, dict(zip(names, val_sets)), samples=args.val_samples, **test_kw)
            log.write({"step": step, "val": val, "weights": which})
            wrapped.train()
        if saves:
            save_checkpoint(files, step, model, ema, optimizer, scaler, failures, label_maps, args, rt, late.clock)
    bar.close()
    if late.halt or log.failed and step < args.max_steps:  # after the checkpoint: each rank's line, the one that
        # stopped the run saying why (--stop_at may come before the step that would carry a record's failure)
        why = batches.failed or log.failed or f"rank {rt.rank} stops: another rank stopped the run"
        sys.exit(f"error: {why}. Saved {files.path} at step {step}: the same command continues from it")
    if step < args.max_steps:  # stopped early: --stop_at or SIGTERM
        log.say(f"\nSIGTERM: saved {files.path} at step {step}; rerun the same command to continue." if late.stop
                else f"\n--stop_at {step}: saved {files.path}; rerun without --stop_at to continue.")

    # ---- the final test: every view of every validation clip
    if args.final_eval == "multiview" and step == args.max_steps:
        heads = test_heads(names, label_maps, args.k710_versions, args.data_dir)  # k710: each version it holds
        val = dict(zip(heads, open_datasets(args, list(heads), "val")))
        log.say(f"\ntesting the {'moving average of the weights (--ema)' if ema else 'weights'}")
        results = test_all(tested, val, heads=heads, label_maps=label_maps, guard=runtime.guard_state(vars(args)),
                           out=os.path.join(args.out_dir, "eval.json"), **test_kw)
        log.write({"step": step, "test": results, "weights": which})
    log.close()


def open_datasets(args, names, split, views=None, guard=None):
    """The datasets of one split, listed once into <out_dir>/listings; the demo sets are written if named.
    guard: the validation sets, whose videos training leaves out unless --train_on_val_videos."""
    try:
        demo.prepare(args.data_dir, names)
        listings = os.path.join(args.out_dir, "listings")
        validation = {n: ds.samples for n, ds in zip(names, guard)} if guard and not args.train_on_val_videos else None
        return [data.build_dataset(n, args.data_dir, split, frames=args.frames, img_size=args.img_size,
                                   views=views, sampling=recipes.sampling(args, n), cache_dir=listings,
                                   validation=validation) for n in names]
    except data.DatasetError as e:
        sys.exit(f"error: {e}")


def build_model(args, heads, ckpt, ckpt_path, rt):
    """-> (model on the device, its source): the run's checkpoint, else --init, else from scratch."""
    overrides = dict(frames=args.frames, img_size=args.img_size, drop_path=args.drop_path)
    torch.manual_seed(args.seed)
    if ckpt is not None:
        want = M.make_config(args.model, attention=args.attention, **overrides) if args.init is None else None
        if want is not None and dataclasses.asdict(want) != ckpt["model_config"]:
            sys.exit(f"error: the checkpoint in {args.out_dir} holds a different architecture than asked for "
                     f"({dataclasses.asdict(want)}); use the run's flags or a new --out_dir")
        if ckpt["config"]["datasets"] != args.datasets:
            sys.exit(f"error: the checkpoint in {args.out_dir} was trained on other --datasets "
                     f"({ckpt['config']['datasets']}); use the same datasets or a new --out_dir")
        kept = ckpt["config"].get("train_on_val_videos", True)  # a run from before the guard kept them
        if kept != args.train_on_val_videos:
            sys.exit(f"error: the checkpoint in {args.out_dir} was trained {'with' if kept else 'without'} validation "
                     f"videos; resume it {'with' if kept else 'without'} --train_on_val_videos, or use a new --out_dir")
        model = M.TimeSformer(M.TimeSformerConfig(**ckpt["model_config"]), heads=heads)
        model.load_state_dict(ckpt["model"])
        run = ckpt["config"]
        model.normalization = checkpoints.mean_std(run["mean"], run["std"], f"{ckpt_path}, the run's")
        source = f"resuming from {ckpt_path} (step {ckpt['step']})"
    elif args.init:
        asked = {"attention": args.attention} if args.attention else {}  # a ViT's; video weights keep theirs
        try:
            model = M.TimeSformer.from_pretrained(args.init, heads=heads, verbose=rt.master, **overrides, **asked)
        except (ValueError, KeyError, ImportError) as e:
            sys.exit(f"error: --init {args.init}: {e}")
        source = f"initialised from {args.init}"
    else:
        model = M.TimeSformer(M.make_config(args.model, attention=args.attention, **overrides), heads=heads)
        source = "training from scratch"
    model.grad_checkpointing = args.grad_checkpoint
    args.attention = model.cfg.attention  # kept in ckpt.pt: the weights' own where --init did not say
    return model.to(rt.device), source


def ema_copy(model):
    """A frozen copy of the weights, for their moving average: built anew, as a deepcopy of a model
    after compile_trunk would keep the compiled forward, which runs the live model's weights."""
    ema = M.TimeSformer(model.cfg, heads={n: h.out_features for n, h in model.heads.items()})
    ema.load_state_dict(model.state_dict())
    return ema.to(next(model.parameters()).device).requires_grad_(False)


def settle(losses, loss_ema, failures, weights, names, args, bar):
    """Take in the values read, [(step, dataset index, loss, whether a rank kept a sample)]: a non-finite loss ends
    the run before anything is logged or saved (the model in memory is lost; the last checkpoint is not); a step
    no rank kept a sample of trained nothing, is counted, and ends the run only for a dataset that never read one."""
    for step, d, loss, kept in losses:
        if not math.isfinite(loss):
            bar.close()
            sys.exit(f"error: loss is {loss} at step {step} on dataset {names[d]}; no checkpoint written. Lower "
                     f"--lr (now {args.lr}), raise --warmup_steps, or use --dtype bf16/fp32.")
        if not kept:
            error = failures.blank_step(names[d], step, data.steps_before(step + 1, d, weights))
            if error:
                bar.close()
                sys.exit(error)
        else:
            loss_ema[names[d]] = loss if names[d] not in loss_ema else 0.9 * loss_ema[names[d]] + 0.1 * loss


def save_checkpoint(files, step, model, ema, optimizer, scaler, failures, label_maps, args, rt, clock):
    """Rank 0 writes it, keeping the one before; every rank counts failures with it and learns whether it
    was written (runtime.save_on_rank0). Once a step, though --stop_at, --save_every and SIGTERM may all ask."""
    if files.step == step:  # ckpt.pt holds this step already
        return
    runtime.save_on_rank0(rt, files, {
        "model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
        "sampler": {"micro": step * args.grad_accum}, "config": vars(args), "label_maps": label_maps,
        **failures.totals(rt), "clock": clock, **({"ema": ema.state_dict()} if ema else {})})


if __name__ == "__main__":
    main()
