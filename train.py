"""
CoVeR co-training: one TimeSformer trunk, one head per dataset, a round-robin schedule that gives every
optimizer step to one dataset; images train as single-frame videos.

    python train.py                                     # built-in demo data, CPU, about 5 minutes
    torchrun --nproc_per_node=8 train.py --datasets k400,ssv2,in21k --init vit_base.pth --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 train.py ...

Restarting with the same --out_dir continues from <out_dir>/ckpt.pt (also after SIGTERM / preemption).
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as M
from eval import evaluate

# Defaults that differ between the CPU demo and real data. Real data follows the official TimeSformer
# K400 recipe (SGD, nesterov, lr 0.005, wd 1e-4, global batch 64) where the paper says.
DEMO = dict(model="demo", img_size=32, frames=8, batch_size=16, optimizer="adamw", lr=1e-3, min_lr=1e-5,
            weight_decay=0.05, warmup_steps=30, max_steps=1500, eval_every=500, save_every=500, dtype="fp32",
            workers=2, drop_path=0.0, mean="0.45,0.45,0.45", std="0.225,0.225,0.225")
REAL = dict(model="base", img_size=224, frames=8, batch_size=64, optimizer="sgd", lr=0.005, min_lr=0.0,
            weight_decay=1e-4, warmup_steps=1000, max_steps=60_000, eval_every=5000, save_every=1000,
            dtype="bf16", workers=8, drop_path=0.1, mean="0.45,0.45,0.45", std="0.225,0.225,0.225")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--datasets", help="comma-separated dataset names (k400,k600,k700,ssv2,mit,in1k,in21k or a custom folder "
                         "name); default: the built-in demo sets demo_kinetics,demo_ssv2,demo_imagenet")
    a("--data_dir", default="data", help="folder holding one sub-folder per dataset")
    a("--out_dir", default="out", help="checkpoint, log.jsonl and eval.json go here")
    a("--model", help="architecture preset: " + ", ".join(M.PRESETS) + " (ignored with --init: read off the weights)")
    a("--attention", default="divided_space_time", choices=M.ATTENTION_TYPES, help="TimeSformer attention type")
    a("--frames", type=int, help="frames per video clip (images are always 1)")
    a("--img_size", type=int, help="crop size in pixels, a multiple of the patch size")
    a("--init", help="starting weights: ImageNet ViT (timm .pth/.safetensors), official TimeSformer .pyth, "
                     "a Hugging Face Timesformer folder, or a ckpt.pt of this project")
    a("--batch_size", type=int, help="global clips per optimizer step (over all GPUs and --grad_accum micro-steps)")
    a("--dataset_batch_size", default="", help="per-dataset override of --batch_size, e.g. in21k=256,ssv2=32 "
                                               "(default: images get 4x --batch_size, see data.py)")
    a("--weights", help="comma-separated sampling weights, one per dataset (default: round robin; the demo gives "
                        "demo_ssv2 weight 2, see data.SPECS)")
    a("--max_steps", type=int, help="optimizer steps in all")
    a("--lr", type=float, help="peak learning rate")
    a("--min_lr", type=float, help="learning rate at the end of the cosine decay")
    a("--warmup_steps", type=int, help="linear warm-up steps")
    a("--weight_decay", type=float, help="weight decay (not on biases, norms and embeddings)")
    a("--optimizer", choices=["adamw", "sgd"], help="adamw, or sgd with nesterov momentum 0.9 (the paper's)")
    a("--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--clip_grad", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--label_smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    a("--drop_path", type=float, help="stochastic depth at the last block")
    a("--dtype", choices=["bf16", "fp16", "fp32"], help="autocast precision (fp16 adds a GradScaler)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad_checkpoint", action="store_true", help="recompute block activations in backward (saves memory)")
    a("--mean", help="per-channel normalisation mean, e.g. 0.5,0.5,0.5 for Google ViT weights")
    a("--std", help="per-channel normalisation std")
    a("--eval_every", type=int, help="validate (clip-level, 1 view) every N steps; 0 = only at the end")
    a("--save_every", type=int, help="write <out_dir>/ckpt.pt every N steps")
    a("--log_every", type=int, default=10, help="append to log.jsonl every N steps")
    a("--final_eval", default="multiview", choices=["multiview", "none"], help="multi-view test of each dataset at the end")
    a("--stop_at", type=int, help="save and exit after this many steps, leaving the schedule of --max_steps intact "
                                   "(for job slots shorter than the run: rerun the same command to continue)")
    a("--resume", action="store_true", help="require a checkpoint in --out_dir to continue from (one there is "
                                            "used anyway: checkpoint > --init > scratch)")
    a("--seed", type=int, default=0, help="seed for initialisation, data order and augmentation")
    a("--workers", type=int, help="DataLoader worker processes per GPU/process")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = p.parse_args(argv)
    args.datasets = args.datasets or ",".join(data.demo_names())
    demo = set(args.datasets.split(",")) <= set(data.demo_names())
    defaults = DEMO if demo else REAL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def check_args(args, world):
    """Fail before any heavy work, with one line that names the fix."""
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
    if args.weights and len(args.weights.split(",")) != len(names):
        errors.append(f"--weights needs one weight per dataset ({len(names)}), got {args.weights!r}")
    if args.weights and any(float(w) <= 0 for w in args.weights.split(",")):
        errors.append(f"--weights must be positive, got {args.weights!r}")
    try:
        sizes = batch_sizes(args, names)
    except data.DatasetError as e:  # an unknown name is looked for as a custom dataset folder
        sys.exit(f"error: {e}")
    for n, b in sizes.items():
        if b % (world * args.grad_accum):
            errors.append(f"batch size {b} of {n} is not divisible by {world} processes x --grad_accum "
                          f"{args.grad_accum}: pick a multiple of {world * args.grad_accum}")
    ckpt = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and not os.path.exists(ckpt):
        errors.append(f"--resume: no checkpoint at {ckpt}; drop --resume to start fresh or point --out_dir at the run")
    if args.init and not os.path.exists(args.init):
        errors.append(f"--init: no file or folder at {args.init}")
    if errors:
        sys.exit("error: " + "\nerror: ".join(errors))


def batch_sizes(args, names):
    """Global batch per dataset: --batch_size, scaled for images by the dataset spec, or overridden."""
    over = dict(kv.split("=") for kv in args.dataset_batch_size.split(",") if kv)
    unknown = set(over) - set(names)
    if unknown:
        sys.exit(f"error: --dataset_batch_size names {sorted(unknown)}, which are not in --datasets")
    return {n: int(over[n]) if n in over else args.batch_size * data.get_spec(n, args.data_dir).batch_scale
            for n in names}


def get_lr(step, args):
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def peak_flops(device, dtype):
    """Peak dense matmul FLOP/s for MFU: published numbers for common GPUs; elsewhere measured here with
    one large GEMM in the training precision (so MFU is relative to what this machine's matmul reaches)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}
        for key, flops in bf16.items():
            if key in name:
                return flops if dtype != torch.float32 else flops / 16
    n = 1024 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype).t()  # column-major left operand: the layout CPU bf16
    b = torch.randn(n, n, device=device, dtype=dtype)      # fallback GEMMs run fastest in (see model.linear)
    a @ b  # warm up
    t, reps = time.perf_counter(), 0
    while time.perf_counter() - t < 0.3:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def save_checkpoint(path, state):
    """Atomic: write a temporary file, flush it to disk, then rename over the old checkpoint. A crash at
    any moment leaves either the old or the new checkpoint, never a half-written one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    check_args(args, world)
    if args.device == "auto":
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
            # torchrun keeps one key-value store for all restarts: a restarted rank can read the address of a
            # rank that died and fail to connect to it (pytorch#135712; reproduced here with torch 2.13)
            print("warning: torchrun --max-restarts shares its store with the workers, and restarts then fail to "
                  "connect; launch as TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (see the README)")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    mean, std = [float(v) for v in args.mean.split(",")], [float(v) for v in args.std.split(",")]
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    # ---- data: every dataset is opened (and checked) before the model is built
    names = args.datasets.split(",")
    def open_sets(split, **kw):
        try:
            return [data.build_dataset(n, args.data_dir, split, frames=args.frames, img_size=args.img_size, **kw)
                    for n in names]
        except data.DatasetError as e:
            sys.exit(f"error: {e}")

    if master:  # rank 0 writes the demo data (if needed) before the others read it
        train_sets = open_sets("train")
    if ddp:
        dist.barrier()
    if not master:
        train_sets = open_sets("train")
    val_sets = open_sets("val", train=False, views=(1, 1))  # clip-level, single view, during training
    heads = {n: len(ds.classes) for n, ds in zip(names, train_sets)}
    label_maps = {n: ds.classes for n, ds in zip(names, train_sets)}
    bs = batch_sizes(args, names)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [ds.spec.weight for ds in train_sets]

    # ---- model: checkpoint in out_dir > --init > scratch
    ckpt = None
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        source = f"resuming from {ckpt_path} (step {ckpt['step']})"
    torch.manual_seed(args.seed)
    overrides = dict(frames=args.frames, img_size=args.img_size, drop_path=args.drop_path)
    if ckpt is not None:
        cfg = M.TimeSformerConfig(**ckpt["model_config"])
        want = M.make_config(args.model, attention=args.attention, **overrides) if args.init is None else None
        if want is not None and dataclasses.asdict(want) != ckpt["model_config"]:
            sys.exit(f"error: {ckpt_path} holds a different architecture ({ckpt['model_config']}) than this command "
                     f"asks for ({dataclasses.asdict(want)}); use the run's own flags or a new --out_dir")
        if ckpt["config"]["datasets"] != args.datasets:
            sys.exit(f"error: {ckpt_path} was trained on --datasets {ckpt['config']['datasets']}, not {args.datasets}; "
                     "use the same datasets or a new --out_dir")
        raw = M.TimeSformer(cfg, heads=heads)
        raw.load_state_dict(ckpt["model"])
    elif args.init:
        raw = M.from_pretrained(args.init, heads=heads, verbose=master, **overrides)
        source = f"initialised from {args.init}"
    else:
        raw = M.TimeSformer(M.make_config(args.model, attention=args.attention, **overrides), heads=heads)
        source = "training from scratch"
    raw.grad_checkpointing = args.grad_checkpoint
    raw.to(device)
    cfg = raw.cfg

    param_groups = raw.param_groups(args.weight_decay)
    if args.optimizer == "adamw":
        fused = device.type == "cuda"
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), fused=fused)
    else:
        optimizer = torch.optim.SGD(param_groups, lr=args.lr, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, failed = 0, {n: 0 for n in names}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        failed = ckpt["failed"] if master else failed  # the saved counts are totals over ranks
        del ckpt

    model = torch.compile(raw) if args.compile else raw
    if ddp:
        # Each step trains one head; the others get no gradient (find_unused_parameters leaves their
        # .grad None, so neither AdamW nor weight decay touches them). All ranks use the same head.
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=len(heads) > 1)

    loader = data.build_train_loader(train_sets, [bs[n] // world // args.grad_accum for n in names],
                                     weights=weights,
                                     grad_accum=args.grad_accum, rank=rank, world=world, seed=args.seed,
                                     workers=args.workers, start_micro=step * args.grad_accum,
                                     pin_memory=device.type == "cuda")

    # ---- start-up report
    n_params = sum(p.numel() for p in raw.parameters())
    say(f"CoVeR train | torch {torch.__version__} | python {platform.python_version()} | device {device} x {world} | {args.dtype}")
    say(f"model: {cfg} | {n_params / 1e6:.2f}M parameters | {source}")
    for n, tr, va, w in zip(names, train_sets, val_sets, weights):
        say(f"  {n:16s} {len(tr):8d} train {len(va):7d} val {len(tr.classes):6d} classes  global batch {bs[n]}  weight {w:g}"
            + (f"  problems: {tr.problems}" if any(tr.problems.values()) else ""))
    say("config: " + json.dumps(vars(args)))

    # ---- preemption: SIGTERM finishes the current step, saves and exits 0 on every rank
    stop_requested = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.__setitem__(0, True))

    peak = peak_flops(device, dtype)
    train_flops = {n: 6 * raw.flops(frames=1 if ds.spec.kind == "image" else args.frames, img_size=args.img_size)
                   for n, ds in zip(names, train_sets)}  # FLOPs per clip: 3 passes x 2 per multiply-add
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None
    logged_failures = set()
    loss_ema = {}
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, dynamic_ncols=True)
    it = iter(loader)
    t_last, clips_since, flops_since = time.perf_counter(), 0, 0.0
    model.train()

    def checkpoint(step):
        totals = all_failed(failed, ddp, device)
        if master:
            save_checkpoint(ckpt_path, {
                "model": raw.state_dict(), "model_config": dataclasses.asdict(cfg), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "sampler": {"micro": step * args.grad_accum},
                "config": vars(args), "label_maps": label_maps, "failed": totals})
        if ddp:
            dist.barrier()

    interrupted = False  # by --stop_at or SIGTERM: saved, no final test, rerun to continue
    while step < args.max_steps:
        if step == args.stop_at:
            checkpoint(step)
            say(f"--stop_at {step}: saved {ckpt_path}; rerun the same command (without --stop_at) to continue.")
            interrupted = True
            break
        # drop path draws from torch's RNG: reseed per step and rank, so a resumed run draws the same
        torch.manual_seed(args.seed + 1_000_003 * (rank + 1) + step)
        lr = get_lr(step, args)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            batch = next(it)
            name = names[batch["dataset"]]
            for path in batch["failed"]:
                failed[name] += 1
                if path not in logged_failures:
                    logged_failures.add(path)
                    tqdm.write(f"[rank {rank}] unreadable sample replaced ({name}): {path}")
            x = data.normalize(batch["x"].to(device, non_blocking=True), mean, std)
            y = batch["y"].to(device, non_blocking=True)
            last = micro == args.grad_accum - 1
            with contextlib.nullcontext() if last or not ddp else model.no_sync():  # sync on the last only
                with autocast:
                    logits = model(x, head=name)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing) / args.grad_accum
                scaler.scale(loss).backward()
            step_loss += loss.detach()
            clips_since += x.shape[0] * world
            flops_since += train_flops[name] * x.shape[0] * world
        if ddp:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        if not torch.isfinite(step_loss):
            # Stop before the optimizer applies it: the last checkpoint on disk stays the good one.
            bar.close()
            if ddp:
                model = None  # see leave_group
                leave_group()
            sys.exit(f"error: loss is {step_loss.item()} at step {step} on dataset {name}; no checkpoint written. "
                     f"Lower --lr (now {args.lr}), raise --warmup_steps, or use --dtype bf16/fp32 instead of fp16.")
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_ema[name] = step_loss.item() if name not in loss_ema else 0.9 * loss_ema[name] + 0.1 * step_loss.item()

        if step % args.log_every == 0 or step == args.max_steps:
            dt = time.perf_counter() - t_last
            stats = {"step": step, "lr": lr, "clips_per_s": clips_since / dt, "mfu": flops_since / dt / (peak * world),
                     "loss": {n: round(v, 4) for n, v in loss_ema.items()}, "failed": all_failed(failed, ddp, device)}
            bar.set_postfix_str(" ".join(f"{n}:{v:.3f}" for n, v in loss_ema.items())
                                + f" | {stats['clips_per_s']:.1f} clips/s lr {lr:.2e} MFU {100 * stats['mfu']:.1f}%")
            if log:
                log.write(json.dumps(stats) + "\n")
                log.flush()
            t_last, clips_since, flops_since = time.perf_counter(), 0, 0.0
        bar.update(1)

        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            results = {n: evaluate(raw, ds, head=n, device=device, dtype=dtype, mean=mean, std=std, rank=rank,
                                   world=world, batch_size=bs[n] // (world * args.grad_accum), workers=args.workers)
                       for n, ds in zip(names, val_sets)}
            if master:
                tqdm.write(f"step {step} val clip top-1: " + " ".join(f"{n} {100 * r['top1']:.1f}" for n, r in results.items()))
                log.write(json.dumps({"step": step, "val": results}) + "\n")
                log.flush()
            model.train()

        stop = torch.tensor(float(stop_requested[0]), device=device)
        if ddp:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if step % args.save_every == 0 or step == args.max_steps or stop.item():
            checkpoint(step)
        if stop.item():
            say(f"\nSIGTERM: saved {ckpt_path} at step {step}; rerun the same command to continue.")
            interrupted = True
            break
    bar.close()

    if args.final_eval == "multiview" and not interrupted:
        say("multi-view test (temporal clips x spatial crops, softmax averaged):")
        results = {}
        for n, ds in zip(names, open_sets("val", train=False)):
            results[n] = evaluate(raw, ds, head=n, device=device, dtype=dtype, mean=mean, std=std, rank=rank,
                                  world=world, batch_size=bs[n] // (world * args.grad_accum), workers=args.workers)
            say(f"  {n:16s} top-1 {100 * results[n]['top1']:5.1f}  top-5 {100 * results[n]['top5']:5.1f}  "
                f"({results[n]['clips']} clips, {results[n]['views']} views, {results[n]['failed']} failed)")
        if master:
            with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
                json.dump(results, f, indent=1)
            log.write(json.dumps({"step": step, "test": results}) + "\n")
    if log:
        log.close()
    if ddp:
        model = None  # see leave_group
        leave_group()


def leave_group():
    """Leave the process group once the DDP wrapper is dropped. If DDP's reducer held the last reference to
    the gloo group, the group's destructor would join gloo's threads with the GIL held while a thread still
    needs the GIL to free a finished collective's tensors: an exit that hangs now and then (pytorch#56297).
    Destroyed from here, the group's own binding releases the GIL first."""
    gc.collect()  # the reducer, if a reference cycle still holds the DDP wrapper
    dist.destroy_process_group()


def all_failed(failed, ddp, device):
    """Per-dataset counts of replaced samples, summed over ranks."""
    if not ddp:
        return dict(failed)
    t = torch.tensor(list(failed.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(failed, t.long().tolist()))


if __name__ == "__main__":
    main()
