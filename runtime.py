"""
What train.py and eval.py share, none of it the method: the device, the process group under torchrun,
precision, and a run's bookkeeping (the checkpoint and the one before it, failed-read counts, meters,
log.jsonl, the start-up report, the step's values read one step late, the clock of time-based cadence).
"""

import contextlib
import datetime
import errno
import gc
import glob
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import loaders
import video

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# rank 0 lists each dataset once (ImageNet-21K: 11M files) while the other ranks wait
STARTUP_TIMEOUT = datetime.timedelta(hours=2)
ASSUMED_MFU = 0.4  # for the start-up estimate of how many clips/s the model takes
UNREADABLE_STEPS = 10  # a dataset none of whose first steps read one sample is taken for unreadable
clock = time.monotonic  # the clock of time-based cadence (a name of its own, which a test can drive)


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    startup_group: object = None  # a gloo group with STARTUP_TIMEOUT, for waits on rank 0

    @property
    def master(self):
        return self.rank == 0

    @property
    def distributed(self):  # in a process group: several processes, or one under train.py --ddp
        return self.startup_group is not None


def setup(device="auto", ddp=False):
    """Pick the device and, when torchrun started several processes (or one, with ddp), join their group
    (nccl on GPUs, gloo on CPUs)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls run as TF32 (peak_flops counts on it)
        torch.backends.cudnn.allow_tf32 = True
    if world == 1 and not ddp:
        return Runtime(0, 1, device)
    if "MASTER_ADDR" not in os.environ:
        sys.exit("error: --ddp joins torchrun's process group: launch as torchrun --nproc_per_node=1 train.py --ddp")
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)):
        # torchrun keeps one store for all restarts, and restarted ranks read the dead ones' addresses
        print("warning: torchrun --max-restarts shares its store with the workers, and restarts then fail to "
              "connect (pytorch#135712); launch as TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...")
    cuda = device.type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Runtime(rank, world, device, dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT))


def rank0_first(rt, fn, *args, **kwargs):
    """fn(...) on rank 0, then on the other ranks, which find what rank 0 wrote (listings, demo data)."""
    if rt.master:
        result = fn(*args, **kwargs)
    if rt.distributed:
        dist.barrier(group=rt.startup_group)
    if not rt.master:
        result = fn(*args, **kwargs)
    return result


def teardown(rt):
    """Leave the process group, once the DDP wrapper is gone: if its reducer held the last reference to a
    gloo group, the group's destructor could hang the exit (pytorch#56297)."""
    if rt.distributed:
        gc.collect()
        dist.destroy_process_group()


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def peak_flops(device, dtype):
    """Dense matmul FLOP/s the hardware can reach, for MFU: the published peak of known GPUs (fp32 runs
    as TF32, half the bf16 rate); elsewhere measured with one large GEMM in `dtype`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16 in GPU_BF16_PEAKS.items():
            if all(word in name for word in key.split()):
                return bf16 if dtype != torch.float32 else bf16 / 2
    n = 1024 if device.type == "cpu" else 4096
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# dense bf16 peaks by device name, most specific first (an H100 SXM reports "NVIDIA H100 80GB HBM3")
GPU_BF16_PEAKS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                  "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12}


def report(args, recipe, model, source, rt, peak, names, train_sets, val_sets, local_batch, num_sample,
           weights):
    """Rank 0's start-up report: the run, the recipe's values, and per dataset its size, batch, steps and
    epochs in this run (samples read over all ranks / size: the sampler reads each epoch whole), how it
    samples frames, whether one process's loader workers keep up, and what listing each split left out."""
    if not rt.master:
        return
    print(f"CoVeR train | recipe {args.recipe} | torch {torch.__version__} | device {rt.device} x {rt.world} "
          f"| {args.dtype} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {source}")
    print(f"video reader: {video.reader()}")
    print(f"recipe {args.recipe} (recipes.py): " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    changed = [f"{k}={getattr(args, k)} (recipe: {v})" for k, v in recipe.items()
               if str(getattr(args, k)) != str(v)]
    if changed:
        print("  changed on the command line: " + ", ".join(changed))
    print("config: " + json.dumps(vars(args)))
    print(f"  {'dataset':16s} {'train':>9s} {'val':>7s} {'classes':>7s} {'batch':>6s} {'R':>3s} {'weight':>6s} "
          f"{'steps':>7s} {'epochs':>6s} {'sampling':>11s} {'1 worker':>11s} {'model takes':>12s} "
          f"{'workers needed':>14s}  (R: clips per decoded sample; model at {ASSUMED_MFU:.0%} MFU)")
    for d, (n, tr, va) in enumerate(zip(names, train_sets, val_sets)):
        batch = local_batch[n] * rt.world * args.grad_accum  # clips per optimizer step
        steps = data.steps_before(args.max_steps, d, weights)
        takes = ASSUMED_MFU * peak / (6 * model.flops(tr.frames, args.img_size))  # clips/s, one process
        loads, R = loader_rate(tr, num_sample[n]), num_sample[n]
        frames = f"kinetics/{tr.spec.rate}" if tr.spec.sampling == "kinetics" else tr.spec.sampling
        problems = {split: ds.problems for split, ds in (("train", tr), ("val", va)) if ds.problems}
        print(f"  {n:16s} {len(tr):9d} {len(va):7d} {len(tr.classes):7d} {batch:6d} {R:3d} {weights[d]:6g} "
              f"{steps:7d} {steps * batch / R / len(tr):6.1f} {frames:>11s} {loads:7.1f} /s {takes:9.0f} /s "
              f"{math.ceil(takes / loads):8d} (have {args.workers})"
              + (f"  problems: {problems}" if problems else ""))
    for line in guard_lines(args, names, train_sets):
        print(line)
    clips = [local_batch[n] * tr.frames * 3 * args.img_size ** 2 for n, tr in zip(names, train_sets)]  # uint8
    # a test batch holds local_batch samples of every view: the final test's, one view in periodic validation
    views = [tr.spec.test_crops * (tr.spec.test_clips if tr.spec.kind == "video" else 1)
             if args.final_eval == "multiview" else 1 for tr in train_sets]
    line = shm_warning(args, max(clips), max(c * v for c, v in zip(clips, views)), pinned=rt.device.type == "cuda")
    if line:
        print(line)


def shm_warning(args, train_batch, test_batch, pinned, shm="/dev/shm"):
    """One line when `shm` has no room for the batches this node's DataLoader workers hand over through it (a
    container's default is 64 MB), with the fix; None when it has. A batch sits there from its worker's hand-over
    until the training process lets it go. Without pinned memory (CPU runs) that is after its use: each worker's
    prefetched batches and the one in use, of the training loader and, while validating or testing beside it, of
    the evaluation loader. With pin_memory (CUDA runs) a thread copies each batch into pinned memory as it arrives,
    so about one batch a worker of each loader sits there. Batch sizes in bytes, the largest of each loader."""
    if not args.workers or not os.path.isdir(shm):
        return None
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    train_mib, test_mib = train_batch / 2**20, test_batch / 2**20
    if pinned:  # each worker's newest batch, until the pin-memory thread has copied it
        per_process = args.workers * (train_batch + test_batch)
        what = (f"about one batch a worker of each loader, on its way into pinned memory: {args.workers} training "
                f"batches of up to {train_mib:.1f} MiB and {args.workers} test batches of up to {test_mib:.1f} MiB")
    else:  # each worker's prefetched batches, and the one in use
        per_process = ((args.workers * loaders.TRAIN_PREFETCH + 1) * train_batch
                       + (args.workers * loaders.EVAL_PREFETCH + 1) * test_batch)
        what = (f"{args.workers} workers x {loaders.TRAIN_PREFETCH} prefetched training batches of up to "
                f"{train_mib:.1f} MiB and the one in use, and while testing {args.workers} x "
                f"{loaders.EVAL_PREFETCH} test batches of up to {test_mib:.1f} MiB and one more")
    need, free = processes * per_process, shutil.disk_usage(shm).free
    if free >= need:
        return None
    return (f"warning: {shm} has {free / 2**20:.0f} MiB free, and the DataLoaders of this node's {processes} "
            f"process(es) keep up to about {need / 2**20:.0f} MiB of batches there ({what} a process); they would "
            f"crash with a bus error: run the container with --ipc=host or --shm-size={math.ceil(2 * need / 2**30)}g")


def guard_lines(args, names, train_sets):
    """What the guard left out of each training set, and whose validation videos they were; or that it is off."""
    if args.train_on_val_videos:
        return ["validation videos: NOT left out of training (--train_on_val_videos): a training set may hold "
                "validation videos of another (Kinetics versions share YouTube videos), and test numbers may "
                "include training videos"]
    lines = ["validation videos: the training samples whose YouTube video is a validation video of a set in "
             "--datasets are left out of training (--train_on_val_videos keeps them):"]
    for n, tr in zip(names, train_sets):
        left = tr.samples.left_out
        if left is None:
            lines.append(f"    {n}: not checked (its file names give no YouTube id)")
            continue
        whose = ", ".join(f"{v}: {c}" for v, c in left["of"].items() if c)
        unchecked = left.get("unchecked", 0)  # the samples whose file names give no id, where others do
        lines.append(f"    {n}: {left['total']} left out" + (f" (validation videos of {whose})" if whose else "")
                     + (f"; {unchecked} not checked (their file names give no YouTube id)" if unchecked else ""))
    return lines


def guard_record(args, names, train_sets):
    """The guard for log.jsonl: on or off, and per training set what it left out (None: no YouTube ids)."""
    if args.train_on_val_videos:
        return {"on": False}
    return {"on": True, "left_out": {n: tr.samples.left_out for n, tr in zip(names, train_sets)}}


def guard_state(config):
    """'on' if the run with this config left validation videos out of training, else 'off' ('not recorded' for
    a run from before the guard)."""
    flag = config.get("train_on_val_videos")
    if flag is None:
        return "not recorded"
    return "off" if flag else "on"


def loader_rate(dataset, num_sample, samples=4):
    """Training clips one worker prepares per second, num_sample from each sample, timed on the first few."""
    t0 = time.perf_counter()
    for i in range(min(samples, len(dataset))):
        dataset[(i, i, num_sample)]
    return num_sample * min(samples, len(dataset)) / (time.perf_counter() - t0)


class Meter:
    """Throughput since the last read, and the share of that time spent waiting for data."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.waited, self.clips, self.flops = time.perf_counter(), 0.0, 0, 0.0

    @contextlib.contextmanager
    def waiting(self):  # time spent in this block is time spent waiting for data
        t0 = time.perf_counter()
        yield
        self.waited += time.perf_counter() - t0

    def count(self, clips, flops):
        self.clips += clips
        self.flops += flops

    def read(self, peak):
        dt = time.perf_counter() - self.start
        stats = {"clips_per_s": self.clips / dt, "mfu": self.flops / dt / peak, "data_wait": self.waited / dt}
        self.reset()
        return stats


class StepValues:
    """What every rank needs from a step, in its one collective: the loss averaged over the ranks, whether any
    rank got SIGTERM, whether any kept a sample, the run's clock (rank 0's seconds of training, counted over
    resumes), whether any quarantined samples (then `shared(rt)` runs on every rank, where the values are read)
    and whether any must stop the run with an error (`halt`). Read one step late: the host queues step N+1 before
    it waits for step N's values, so the GPU does not idle while the host reads."""

    def __init__(self, rt, seconds=0.0, shared=None):
        self.rt, self.pending, self.start, self.shared = rt, [], clock() - seconds, shared  # seconds: a resumed run's
        self.stop, self.halt, self.clock = False, False, seconds  # as of the newest values read

    def send(self, step, dataset, loss, stop, kept=True, quarantined=False, halt=False):
        """Queue step `step`'s values (loss: a 0-d tensor; the flags: this rank's) into the collective
        and, on a GPU, a copy to the host that an event marks: the host later waits for that copy alone, not for
        the work queued after it."""
        rt = self.rt
        seconds = (clock() - self.start) * rt.world if rt.master else 0.0  # the average over the ranks is rank 0's
        flags = (stop, kept, seconds, quarantined, halt)
        values = torch.stack([loss, *(torch.full_like(loss, float(v)) for v in flags)])
        if rt.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.AVG)
        copied = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)  # into pinned memory
            copied = torch.cuda.Event()
            copied.record()
        self.pending.append((step, dataset, values, copied))

    def read(self, everything=False):
        """-> [(step, dataset, loss, whether a rank kept a sample)] of the steps sent before the newest one
        (everything: it too), in order; self.stop and self.clock follow the values read."""
        ready = self.pending if everything else self.pending[:-1]
        self.pending = self.pending[len(ready):]
        losses = []
        for step, dataset, values, copied in ready:
            if copied is not None:
                copied.synchronize()
            loss, stop, kept, self.clock, quarantined, halt = values.tolist()  # the step's one read of the device
            self.stop, self.halt = self.stop or stop > 0, self.halt or halt > 0
            if quarantined and self.shared:  # on every rank at this same read, so before any save that follows
                self.shared(self.rt)
            losses.append((step, dataset, loss, kept != 0))  # an average of 0s and 1s: 0 only if every one is
        return losses


def due(every, step, since, now):
    """Whether --save_every / --eval_every falls on this step: every N steps (0: never), or 'Mmin' when the run's
    clock passed a multiple of M minutes between the step before's decision (since) and this one's (now). The
    run's clock counts over resumes, so a resumed run keeps the times it saves at."""
    if isinstance(every, int):
        return every > 0 and step % every == 0
    period = 60 * float(every.removesuffix("min"))
    return now // period > since // period


def compile_counts():
    """torch.compile's work so far, for log.jsonl: graphs compiled, recompiles (a graph compiled again for new
    guards, e.g. an input shape not seen before) and graph breaks. {} where PyTorch keeps them elsewhere."""
    try:
        from torch._dynamo.utils import counters, get_compilation_metrics
        recompiles = sum(m.recompile_reason is not None for m in get_compilation_metrics())
        return {"compile": {"graphs": counters["stats"]["unique_graphs"], "recompiles": recompiles,
                            "graph_breaks": sum(counters["graph_break"].values())}}
    except (ImportError, AttributeError):  # private to dynamo: a logged count is not worth a crash
        return {}


class Failures:
    """Samples replaced because their file could not be read, each path told once, and samples dropped
    because no substitute could be read either, each told in a line: counted per dataset. And blank steps:
    steps whose every sample was dropped on every rank, which train nothing, each told in a line."""

    def __init__(self, names, rank):
        self.counts, self.dropped = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        self.blank = dict.fromkeys(names, 0)  # the same on every rank: each learns it from the step's collective
        self.told, self.rank = set(), rank

    def add(self, name, paths, dropped=()):
        for path in paths:
            self.counts[name] += 1
            if path not in self.told:
                self.told.add(path)
                tqdm.write(f"[rank {self.rank}] unreadable sample replaced ({name}): {path}")
        for line in dropped:
            self.dropped[name] += 1
            tqdm.write(f"[rank {self.rank}] warning: {name}: {line}")

    def blank_step(self, name, step, steps):
        """Step `step`, the steps-th of dataset `name`, lost every sample on every rank: counted and told.
        -> the line that stops the run, on every rank, when none of the dataset's first UNREADABLE_STEPS
        steps read a sample, else None."""
        self.blank[name] += 1
        if self.blank[name] == steps == UNREADABLE_STEPS:
            return (f"error: no sample of {name} could be read in its first {steps} steps (see the lines above); "
                    f"check its files, the codecs your video reader supports, and disk access")
        if self.rank == 0:
            tqdm.write(f"warning: step {step} trained nothing: every sample of {name} was dropped, on every rank")

    def restore(self, ckpt):
        """A resumed run's counts: the checkpoint's are totals over the ranks, so rank 0 carries them on;
        every rank carries on the blank steps."""
        if self.rank == 0:
            self.counts.update(ckpt["failed"])
            self.dropped.update(ckpt.get("dropped", {}))
        self.blank.update(ckpt.get("blank_steps", {}))

    def totals(self, rt):
        """{'failed': {dataset: count}, 'dropped': {dataset: count}} over all ranks, and 'blank_steps'."""
        counts = list(self.counts.values()) + list(self.dropped.values())
        if rt.distributed:  # int64: exact, and on every device (MPS has no float64)
            t = torch.tensor(counts, dtype=torch.int64, device=rt.device)
            dist.all_reduce(t)
            counts = t.tolist()
        return {"failed": dict(zip(self.counts, counts)),
                "dropped": dict(zip(self.dropped, counts[len(self.counts):])), "blank_steps": dict(self.blank)}


class RunLog:
    """log.jsonl in out_dir, one JSON record a line, and messages between the progress bar's lines: rank 0
    only. With --tensorboard and --wandb PROJECT the records' numbers go there too, at the record's step,
    so a resumed run continues the same curves (W&B: the run id is kept in out_dir)."""

    def __init__(self, out_dir, enabled, args):
        self.path, self.enabled, self.file = os.path.join(out_dir, "log.jsonl"), enabled, None
        self.failed = None  # why log.jsonl cannot be written: the loop stops on it, after a checkpoint
        self.tensorboard = self.wandb = None
        if enabled and args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # an opt-in extra: pip install tensorboard
            self.tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if enabled and args.wandb:
            import wandb  # an opt-in extra: pip install wandb

            id_file = os.path.join(out_dir, "wandb_run_id")
            run_id = open(id_file).read().strip() if os.path.exists(id_file) else os.urandom(6).hex()
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=args.wandb, id=run_id, resume="allow", dir=out_dir,
                                    config=vars(args))

    def write(self, record):
        if self.enabled and not self.failed:
            try:  # opened at the first write: a folder that refuses it is met here, as a full disk is
                self.file = self.file or open(self.path, "a")
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:
                self.failed = f"cannot write {self.path}: {e.strerror or e}"
        values = scalars(record) if self.tensorboard or self.wandb else {}
        if self.tensorboard:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(values, step=record["step"])

    def say(self, message):
        if self.enabled:
            tqdm.write(message)

    def close(self):
        """Close the loggers; a write that failed since the loop last looked ends the run here, in one line."""
        if self.file:
            with contextlib.suppress(OSError):  # a full disk refuses the last flush again
                self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.failed:
            sys.exit(f"error: {self.failed}")


def scalars(record, prefix=""):
    """The numbers of a log record by path: {'loss': {'k400': 2.1}, 'test': {'k400': {'top1': .7, ...}}}
    -> {'loss/k400': 2.1, 'test/k400/top1': 0.7, ...}; the step and per-class accuracies left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict) and key != "per_class_top1":
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = value
    return out


# what train.py writes into a checkpoint; resuming needs every one
RUN_KEYS = ("model", "model_config", "optimizer", "scaler", "step", "sampler", "config", "label_maps", "failed")


class CheckpointError(Exception):
    """A run's checkpoint that cannot be read or written, said in one line."""


class CheckpointFiles:
    """A run's checkpoint and the one before it: <out_dir>/ckpt.pt and ckpt.prev.pt. A save writes a
    temporary file, then renames ckpt.pt to ckpt.prev.pt and the new file to ckpt.pt: no second write, one
    more file on disk, and a ckpt.pt spoilt later (cut short by a copy, a broken disk) still leaves the
    previous one to resume from."""

    def __init__(self, path):
        root, ext = os.path.splitext(path)
        self.path, self.previous = path, f"{root}.prev{ext}"
        self.step = None  # the step of ckpt.pt when it is known to be whole (read or written here)
        self.previous_step = None

    def load(self):
        """-> (checkpoint, its path): the newest that reads and holds what train.py writes, with a line on
        the files skipped; (None, None) for a run with no checkpoint. A temporary file that a save left whole
        (it stopped between its two renames, with no ckpt.pt) is newer than ckpt.prev.pt: it is renamed to
        ckpt.pt, finishing that save. CheckpointError, one line, where there are checkpoint files and none
        of them reads."""
        stopped = self.stopped()
        skipped = []
        on_disk = any(os.path.exists(p) for p in (self.path, self.previous))
        for path in [self.path, *stopped, self.previous] if on_disk else stopped:
            try:
                ckpt = self.read(path)
            except ValueError as e:
                if path not in stopped:  # a temporary file that does not read is a save cut short: expected
                    skipped.append(str(e))
                continue
            said = skipped + [f"resuming from {path} (step {ckpt['step']})"]
            if path in stopped:  # finish the save that stopped between its renames
                try:
                    os.replace(path, self.path)
                except OSError as e:
                    raise CheckpointError(f"cannot rename {path}, the whole checkpoint of step {ckpt['step']} "
                                          f"that a save left, to {self.path}: {e.strerror}") from None
                try:
                    sync_folder(os.path.dirname(self.path) or ".")
                except OSError as e:
                    raise CheckpointError(f"renamed {path}, the whole checkpoint of step {ckpt['step']} that a save "
                                          f"left, to {self.path}, but cannot sync its folder: {e.strerror}") from None
                said.append(f"a save left it whole but did not rename it: now {self.path}")
                path, self.step = self.path, ckpt["step"]
            if len(said) > 1:
                print("warning: " + "; ".join(said))
            return ckpt, path
        if not on_disk:
            return None, None
        raise CheckpointError("no checkpoint to resume from: " + "; ".join(skipped) + ". Put a good ckpt.pt in "
                              "its place, or use a new --out_dir to start again")

    def stopped(self):
        """The temporary files saves left, newest first."""
        return sorted(glob.glob(glob.escape(self.path) + ".tmp-*"), key=os.path.getmtime, reverse=True)

    def any(self):
        """Whether load has a checkpoint to resume from, without reading one: ckpt.pt or ckpt.prev.pt (load
        reads them or says why not), or a temporary file a save left whole (a whole zip archive, as torch.save
        writes; a cut-short one is skipped by load)."""
        return (any(os.path.exists(p) for p in (self.path, self.previous))
                or any(zipfile.is_zipfile(p) for p in self.stopped()))

    def read(self, path):
        """The checkpoint in `path`, checked (ValueError, one line, otherwise); the step of ckpt.pt or
        ckpt.prev.pt noted."""
        ckpt = checkpoints.read_file(path)
        check_run_checkpoint(ckpt, path)
        if path == self.path:
            self.step = ckpt["step"]
        elif path == self.previous:
            self.previous_step = ckpt["step"]
        return ckpt

    def save(self, state):
        """Write the temporary file and flush it to disk, rename (keeping the previous one), sync the
        folder so the renames last. When the disk or the folder refuses: CheckpointError, one line, with
        the temporary file removed and what is intact named (where only the sync fails: what was saved)."""
        folder, tmp = os.path.dirname(self.path) or ".", f"{self.path}.tmp-{os.getpid()}"
        need = state_bytes(state) * 1.05 + 2**20  # the tensors, and room for the archive's own bytes
        try:
            for stale in glob.glob(glob.escape(self.path) + ".tmp-*"):  # a killed save's: it only takes space
                os.remove(stale)
                tqdm.write(f"removed {stale}, left by a save that did not finish")
            free = shutil.disk_usage(folder).free
            if self.step is not None and free < need <= free + size_of(self.previous):
                # short of space: go on with a whole ckpt.pt alone rather than stop
                os.remove(self.previous)
                self.previous_step = None
                tqdm.write(f"low on disk space: removed {self.previous} to make room for step {state['step']}")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            if self.step is not None and os.path.exists(self.path):  # a whole ckpt.pt becomes the previous
                os.replace(self.path, self.previous)                # one; a spoilt one is replaced
                self.step, self.previous_step = None, self.step
            os.replace(tmp, self.path)
            self.step = state["step"]
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise CheckpointError(self.failure(folder, state["step"], need, e)) from None
        try:
            sync_folder(folder)
        except OSError as e:  # written and renamed, but the rename may not outlast a crash of the machine
            before = f"; {self.previous} holds step {self.previous_step}" if self.previous_step is not None else ""
            raise CheckpointError(f"saved the checkpoint of step {self.step} as {self.path}, but cannot sync "
                                  f"{folder} ({e.strerror}): a crash of the machine may undo the save"
                                  + before) from None

    def failure(self, folder, step, need, error):
        """One line: the folder, the step, why, the size needed, and the checkpoints still whole."""
        cause = error  # the operating system's error, which torch.save keeps as the context of its own
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        why = (cause.strerror or str(cause)) if cause is not None else str(error).splitlines()[0]
        if os.path.isdir(folder):
            why += f" (it needs about {need / 1e6:.1f} MB{free_space(folder)})"
        else:
            why = f"the folder is gone (it needed about {need / 1e6:.1f} MB)"
        intact = [f"{p} (step {s})" for p, s in ((self.path, self.step), (self.previous, self.previous_step))
                  if s is not None and os.path.exists(p)]
        return (f"cannot save the checkpoint of step {step} in {folder}: {why}. No temporary file is left; "
                + (f"intact: {', '.join(intact)}" if intact else "no earlier checkpoint of this run is on disk"))


def save_on_rank0(rt, files, state):
    """Rank 0 writes `state` and tells the other ranks whether it could: a save that fails ends every rank
    with one line, and no rank waits for a rank 0 that has stopped."""
    step = state["step"]
    error = None
    if rt.master:
        try:
            files.save(state)
        except CheckpointError as e:
            error = f"error: {e}"
    if rt.distributed:  # in place of a barrier: a save step's one extra wait
        ok = torch.tensor(float(error is None), device=rt.device)
        dist.broadcast(ok, src=0)
        if not rt.master and not ok.item():
            error = f"error: rank {rt.rank} stops: rank 0 could not save the checkpoint of step {step}"
    if error:
        sys.exit(error)
    files.step = step


def resume_on_every_rank(rt, files):
    """-> (checkpoint, its path), or (None, None), the same on every rank: rank 0 chooses it
    (CheckpointFiles.load) and names the file and its step to the other ranks, which read that file and check
    the step. Where any rank cannot, every rank stops with one line: ranks that started from different steps
    would train different datasets in one step, and then their collectives would no longer line up."""
    ckpt = path = error = None
    if rt.master:
        try:
            ckpt, path = files.load()
        except CheckpointError as e:
            error = str(e)
    if rt.world > 1:  # on the gloo group: Python objects, and the long wait while rank 0 reads
        choice = [path, ckpt["step"] if ckpt else None]
        dist.broadcast_object_list(choice, src=0, group=rt.startup_group)
        if not rt.master and choice[0] is not None:
            path, step = choice
            try:
                ckpt = files.read(path)
                if ckpt["step"] != step:
                    raise ValueError(f"{path} holds step {ckpt['step']} here: is --out_dir one folder that "
                                     "every node shares?")
            except ValueError as e:
                error = f"rank {rt.rank} cannot resume from {path} (step {step}), as rank 0 does: {e}"
        errors = [None] * rt.world
        dist.all_gather_object(errors, error, group=rt.startup_group)
        first = next((r for r, e in enumerate(errors) if e), rt.rank)
        if first != rt.rank:
            error = f"rank {rt.rank} stops: {errors[first]}"
    if error:
        sys.exit(f"error: {error}")
    return ckpt, path


def check_run_checkpoint(ckpt, path):
    """The cheap checks that a file read whole is a checkpoint of train.py: its keys, its step, its model
    config against its weights. ValueError otherwise."""
    missing = [k for k in RUN_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RUN_KEYS)
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (it lacks {', '.join(missing)})")
    step, config, weights = ckpt["step"], ckpt["model_config"], ckpt["model"]
    if not isinstance(step, int) or step < 0 or \
            ckpt["sampler"] != {"micro": step * ckpt["config"].get("grad_accum", 1)}:
        raise ValueError(f"{path} holds step {step!r}, which its sampler's position does not match")
    cls_token, last = weights.get("cls_token"), f"blocks.{config.get('depth', 0) - 1}.norm2.weight"
    if cls_token is None or cls_token.shape[-1] != config.get("width") or last not in weights:
        raise ValueError(f"{path} holds a model config that does not match its weights")


def size_of(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def state_bytes(state):
    """The bytes of the tensors in a nested checkpoint: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.untyped_storage().nbytes()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def free_space(folder):
    """'; N MB are free' for an error message, or nothing where the file system will not say."""
    try:
        return f"; {shutil.disk_usage(folder).free / 1e6:.1f} MB are free"
    except OSError:
        return ""


# what a file system answers when it cannot sync a folder (or open one to sync it); its renames are then as
# durable as they get there
CANNOT_SYNC = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EROFS, errno.EBADF, errno.EACCES, errno.EPERM}


def sync_folder(folder):
    """Make the renames in `folder` durable, where the file system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in CANNOT_SYNC:
            raise
