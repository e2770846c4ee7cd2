"""
The first run on a GPU machine (or a new driver, or PyTorch) proven in one command, sized for under 10 minutes
on one GPU (each section prints its seconds on stderr). One table, written to JSON with --json; exit status 1
if any row failed.

  sdpa      the model's own Attention.forward, whose q, k and v are strided views of its packed qkv, at the real
            spatial (B*8, 12, 197, 64) and temporal (B*196, 12, 8, 64) shapes, under each SDPA backend, forward
            and backward (output, input and qkv-weight gradients), against the math backend in fp32; and which
            backend PyTorch picks
  bf16      a train step in bf16 against the same step in fp32 (exact fp32 matmuls, the same drop-path draws):
            the loss, and each parameter's gradient (before clipping): its cosine and its norm's ratio
  grads     the bf16 step with --grad_checkpoint and with --compile: the gradients of the plain step (before
            clipping, which would scale a gradient of the wrong size back)
  launches  kernels that one eager bf16 train step launches (on the CPU: the operators that would each launch one)
  torchrun  train.py under `torchrun --nproc_per_node=1 ... --ddp`: a real process group (NCCL; gloo on the CPU)
            and DDP wrapper for one process, ViT-B 8x224, the cover recipe (SGD, drop path 0.1, bf16), clips
            and images alternating (the demo sets at 224): eager to a --stop_at, its resume, --compile (with a
            validation on a fixed subset mid-run; graphs, recompiles and graph breaks from log.jsonl), and
            --grad_accum 2
  speed     the resumed eager run and the compiled one under the profiler (tools/profile_train.py): step time,
            MFU (train.py's meter), peak memory, the GPU's idle share, kernels a step; whether --compile should
            become the cover recipe's default
  batch     the largest image batch that trains, and whether it is past flash attention's limit of sequences

On the CPU, or with --quick, the same rows on the tiny demo model (the launch count on ViT-B's structure at
32x32), with aot_eager for --compile and gloo for the process group: what CI runs.

    python tools/selfcheck.py --json selfcheck.json      # on the GPU
    python tools/selfcheck.py --quick                    # the tiny model on the CPU
    python tools/selfcheck.py --readme selfcheck.json    # the README's GPU table row, from a run's JSON
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules are in the folder above, not on the path of a script

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import model as M  # noqa: E402
import runtime  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
NOT_AVAILABLE = ("No available kernel", "No viable backend")  # the CUDA and the CPU wording
# Largest difference over the largest reference value. bf16 keeps 8 significant bits (0.4%) and a kernel
# rounds at a few places; a broken kernel is off by tens of percent, or NaN.
SDPA_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
# Relative L2 error of each parameter's gradient: compile and recompute round bf16 at other places, which
# moves a gradient by a few percent at most; a lost or wrong branch moves it by its whole size.
GRAD_TOL = 0.1
# bf16 against fp32: the loss within 2%, each parameter's gradient pointing the same way (a wrong cast or an
# overflow turns one around, or zeroes it) and of the same size within 10% (a gradient summed twice, or scaled
# by a forgotten factor, points the same way)
BF16_LOSS_TOL, BF16_COSINE, BF16_NORM = 0.02, 0.98, 0.1
VARIANTS = {"plain": (False, False), "ckpt": (False, True), "compile": (True, False)}  # (compile, checkpoint)
HEADS = {"video": 400, "image": 1000}
IMAGE_BATCHES = (64, 8192)  # the search doubles from the first, up to the second to bound its time
SPEEDUP_FOR_DEFAULT = 1.1  # --compile becomes the cover default when its step is this much faster


@dataclasses.dataclass
class Setup:
    """What every section needs: the device, the model config and batch it checks, and where runs write."""
    device: torch.device
    cfg: M.TimeSformerConfig  # the cover recipe's drop path; sections that need it off say so
    batch: int  # clips a step; images 4x (data.image_spec)
    compile_backend: str
    quick: bool
    work: str  # a folder for the torchrun runs' data and output
    speed: dict = dataclasses.field(default_factory=dict)  # of the torchrun runs, by name: for --json


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="the tiny model instead of ViT-B 8x224")
    p.add_argument("--json", help="also write the table to this file")
    p.add_argument("--readme", metavar="JSON", help="print the README's GPU table row from a run's JSON, and exit")
    p.add_argument("--work", help="folder for the torchrun runs (default: a temporary one, removed at the end)")
    p.add_argument("--compile_backend", help="default: inductor on CUDA, aot_eager on the CPU (where "
                                             "inductor's C++ build takes minutes)")
    return p.parse_args(argv)


def row(check, result, detail="", ok=None):
    """One line of the table; ok is True, False (a failure) or None (information only)."""
    return {"check": check, "result": result, "detail": detail, "ok": ok}


def error_row(check, error):
    traceback.print_exc()  # the table keeps one line per check; the whole story goes to stderr
    first_line = str(error).strip().split("\n")[0]
    return row(check, "error", f"{type(error).__name__}: {first_line[:90]}", False)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full precision, not TF32 (which runtime.setup allows on GPUs): for the references."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- sdpa: each backend forced inside the model's Attention.forward

def attend(att, x, grad_out, backend=None, dtype=torch.float32):
    """[output, input gradient, qkv-weight gradient] of Attention.forward on x (sequences, tokens, width) under
    autocast to `dtype`, SDPA's `backend` forced (None: PyTorch's choice)."""
    x = x.detach().requires_grad_()
    att.zero_grad(set_to_none=True)
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        with runtime.autocast(x.device, dtype):
            out = att(x)
        out.float().backward(grad_out)
    return [out.detach().float(), x.grad, att.qkv.weight.grad]


def unavailable_reason(caught):
    """Why the forced backend did not run, from PyTorch's warnings (the others say 'runtime disabled')."""
    for w in caught:
        text = str(w.message).split(" (Triggered internally")[0].strip()
        if text and "runtime disabled" not in text and not text.endswith("because:"):
            return text[:90]
    return ""


def sdpa_row(check, inputs, dtype, backend, reference, outputs):
    """-> (the row of one backend, its output or None); `outputs` holds the outputs of the forced ones."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = attend(*inputs, backend, dtype)
        except RuntimeError as e:
            if any(s in str(e) for s in NOT_AVAILABLE):
                return row(check, "not available", unavailable_reason(caught)), None
            return error_row(check, e), None
    errors = [((x.float() - r).abs().max() / r.abs().max()).item() for x, r in zip(got, reference)]
    ok = all(e <= SDPA_TOL[dtype] for e in errors)  # False for NaN too
    result = "runs"
    if backend is None:  # PyTorch's choice is the forced backend that gave the same output, bit for bit
        same = [name for name, out in outputs.items() if out is not None and torch.equal(out, got[0])]
        result = f"runs (= {same[0]})" if same else "runs (unidentified)"
    return row(check, result, "Δ out {:.1e}  dx {:.1e}  dW_qkv {:.1e}".format(*errors), ok), got[0]


def check_sdpa(s):
    cfg, device = s.cfg, s.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU kernels are checked in fp32
    n, head_dim = (cfg.img_size // cfg.patch_size) ** 2, cfg.width // cfg.num_heads
    torch.manual_seed(0)
    att = M.Attention(cfg.width, cfg.num_heads, cfg.qkv_bias).to(device)
    rows = []
    for name, (sequences, tokens) in {"spatial": (s.batch * cfg.frames, 1 + n),
                                      "temporal": (s.batch * n, cfg.frames)}.items():
        torch.manual_seed(0)
        x, grad_out = (torch.randn(sequences, tokens, cfg.width, device=device) for _ in range(2))
        with exact_fp32():
            reference = attend(att, x, grad_out, SDPBackend.MATH)
        outputs = {}
        for label, backend in [*BACKENDS.items(), ("default", None)]:
            check = f"sdpa {name} {(sequences, cfg.num_heads, tokens, head_dim)} {label}"
            line, outputs[label] = sdpa_row(check, (att, x, grad_out), dtype, backend, reference, outputs)
            rows.append(line)
    return rows


# ---- bf16 and grads: train steps compared with a reference step

def make_model(cfg, device):
    torch.manual_seed(0)
    model = M.TimeSformer(cfg, heads=HEADS).to(device)
    with torch.no_grad():  # a fresh temporal_fc is zero, which would hide temporal attention from the check
        for block in model.blocks:
            nn.init.trunc_normal_(block.temporal_fc.weight, std=0.02)
    return model


def make_batch(cfg, device, kind, n):
    """n random clips (n, C, T, S, S), or images (T = 1), and labels for the kind's head."""
    torch.manual_seed(1)
    frames = cfg.frames if kind == "video" else 1
    x = torch.randn(n, cfg.in_chans, frames, cfg.img_size, cfg.img_size, device=device)
    return x, torch.randint(HEADS[kind], (n,), device=device)


def sgd(model):
    """The cover recipe's optimizer (train.py), in the foreach form a GPU runs."""
    return torch.optim.SGD(model.param_groups(1e-4), lr=0.005, momentum=0.9, nesterov=True, foreach=True)


def train_step(model, optimizer, x, y, head, dtype=torch.bfloat16, seed=2, grads=None):
    """One training step as train.py takes it (drop path drawn from `seed`) -> its loss. grads, a dict where
    given, gets each parameter's gradient as the backward left it: before clipping scales them all alike."""
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with runtime.autocast(x.device, dtype):
        logits = model(x, head=head)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    if grads is not None:
        grads.update(gradients(model))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # the form a GPU runs
    optimizer.step()
    return loss.item()


def gradients(model):
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_error(grads, reference):
    """The largest relative L2 error of a parameter's gradient, and that parameter's name."""
    worst, worst_name = 0.0, "-"
    for name, ref in reference.items():
        if name not in grads:
            return math.inf, f"{name} got no gradient"
        error = ((grads[name] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        if not error <= worst:  # NaN counts as the worst
            worst, worst_name = error, name
    return worst, worst_name


def worst_norm_ratio(grads, reference):
    """The ratio of a parameter's gradient norm to its reference's farthest from 1 (either way), and its name."""
    worst, worst_name, farthest = 1.0, "-", 0.0
    for name, ref in reference.items():
        if name not in grads:
            return 0.0, f"{name} got no gradient"
        ratio = (grads[name].norm() / ref.norm().clamp_min(1e-30)).item()
        distance = abs(math.log(ratio)) if ratio > 0 else math.inf  # 0 and NaN: the farthest
        if distance > farthest:
            worst, worst_name, farthest = ratio, name, distance
    return worst, worst_name


def lowest_cosine(grads, reference):
    """The lowest cosine between a parameter's gradient and its reference, and that parameter's name."""
    worst, worst_name = 1.0, "-"
    for name, ref in reference.items():
        if name not in grads:
            return -math.inf, f"{name} got no gradient"
        cosine = F.cosine_similarity(grads[name].flatten(), ref.flatten(), dim=0, eps=1e-30).item()
        if not cosine >= worst:  # NaN counts as the worst
            worst, worst_name = cosine, name
    return worst, worst_name


def check_bf16(s):
    rows = []
    for kind in ("video", "image"):
        x, y = make_batch(s.cfg, s.device, kind, s.batch if kind == "video" else 4 * s.batch)
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            model, grads = make_model(s.cfg, s.device), {}
            with exact_fp32() if dtype == torch.float32 else contextlib.nullcontext():
                runs[dtype] = train_step(model, sgd(model), x, y, kind, dtype, grads=grads), grads
            del model
        (loss32, grads32), (loss16, grads16) = runs[torch.float32], runs[torch.bfloat16]
        cosine, name = lowest_cosine(grads16, grads32)
        ratio, ratio_name = worst_norm_ratio(grads16, grads32)
        gap = abs(loss16 - loss32) / abs(loss32)
        ok = gap <= BF16_LOSS_TOL and cosine >= BF16_COSINE and abs(ratio - 1) <= BF16_NORM
        rows.append(row(f"bf16 {kind} step", f"loss {loss16:.4f} vs {loss32:.4f}",
                        f"grad cosine >= {cosine:.4f} ({name}), norm ratio {ratio:.4f} ({ratio_name}), drop path "
                        f"{s.cfg.drop_path}", ok))
    return rows


def check_grads(s):
    """The bf16 step plain, with grad checkpointing and compiled; no drop path: compiled code draws other random
    numbers than eager, and the variants must agree."""
    cfg = dataclasses.replace(s.cfg, drop_path=0.0)
    base = make_model(cfg, s.device)
    rows = []
    for kind in ("video", "image"):
        x, y = make_batch(cfg, s.device, kind, s.batch if kind == "video" else 4 * s.batch)
        reference = None
        for variant, (compiled, ckpt) in VARIANTS.items():
            check = f"grads {kind} {variant}"
            try:
                model = copy.deepcopy(base)
                model.grad_checkpointing = ckpt
                if compiled:
                    model.compile_trunk(backend=s.compile_backend)  # as train.py --compile does
                grads = {}
                loss = train_step(model, sgd(model), x, y, kind, grads=grads)
            except Exception as e:  # a variant that crashes is a failed row, and the others still run
                rows.append(error_row(check, e))
                continue
            if variant == "plain":
                reference, detail, ok = grads, "the reference", math.isfinite(loss)
            elif reference is None:
                detail, ok = "no plain step to compare with", math.isfinite(loss)
            else:
                error, name = gradient_error(grads, reference)
                detail = f"grad Δ {error:.1e} vs plain (largest: {name})"
                ok = math.isfinite(loss) and error <= GRAD_TOL
            rows.append(row(check, f"loss {loss:.4f}", detail, ok))
    torch.compiler.reset()  # lets go of the compiled graphs and the memory they hold
    return rows


# ---- launches: kernels of one eager train step

OP_KINDS = {}  # operator name -> 'kernel', 'decomposed' or 'none', as kernel_op finds it
NO_KERNEL = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
             "aten::resize_", "aten::_unsafe_view", "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense")


def kernel_op(name):
    """Would the operator `name` (as the profiler names it: 'aten::add') launch a kernel when called below
    autograd: 'kernel'; 'none' for views, allocations and reads to the host; 'decomposed' for one that PyTorch
    decomposes into others (which the profiler sees)."""
    if name not in OP_KINDS:
        packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
        flags = []  # (decomposed, view) of each overload but the out= ones
        for overload in packet.overloads() if packet is not None else ():
            with contextlib.suppress(AttributeError, RuntimeError):  # TorchScript-only overloads
                if "out" not in overload:
                    op = getattr(packet, overload)
                    flags.append((op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd),
                                  op.is_view))
        decomposed = bool(flags) and all(d for d, _ in flags)
        view = bool(flags) and all(v for _, v in flags)
        OP_KINDS[name] = "decomposed" if decomposed else "none" if view or name in NO_KERNEL else "kernel"
    return OP_KINDS[name]


def count_cpu_launches(events):
    """Operators that would each launch a kernel on a GPU, from the profiler's CPU events: in each nest of
    calls, the top-most that PyTorch does not decompose further (a foreach op counts once)."""
    count, stack = 0, [e for e in events if e.cpu_parent is None]
    while stack:
        event = stack.pop()
        kind = kernel_op(event.name) if event.name.startswith("aten::") else "decomposed"
        count += kind == "kernel"
        if kind == "decomposed":
            stack.extend(event.cpu_children)
    return count


def launches(model, optimizer, x, y, head):
    """Kernels launched by one train step: on a GPU those the profiler sees run, on the CPU the count of
    count_cpu_launches."""
    cuda = x.device.type == "cuda"
    for _ in range(2):  # warm-up: lazy initialisation, the allocator, the optimizer's state
        train_step(model, optimizer, x, y, head)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(model, optimizer, x, y, head)  # its loss.item() waits for the GPU
    events = prof.events()
    if cuda:
        return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")) for e in events)
    return count_cpu_launches(events)


def check_launches(s):
    """On ViT-B's structure (12 blocks; on the CPU at 32x32, which leaves the count as it is)."""
    cuda = s.device.type == "cuda"
    cfg = M.make_config("base", img_size=224 if cuda else 32, drop_path=0.1)
    model = make_model(cfg, s.device)
    optimizer = sgd(model)
    rows = []
    for kind in ("video", "image"):
        x, y = make_batch(cfg, s.device, kind, (8 if cuda else 2) * (1 if kind == "video" else 4))
        where = "kernels run" if cuda else "operators that launch a kernel on a GPU"
        rows.append(row(f"launches {kind} step", str(launches(model, optimizer, x, y, kind)),
                        f"eager bf16, ViT-B structure at {cfg.img_size}: {where}"))
    return rows


# ---- torchrun and speed: train.py itself, in a real process group, and under the profiler

def torchrun(s, name, flags, skip=0, steps=0, timeout=600):
    """Run `torchrun --nproc_per_node=1 tools/profile_train.py ... -- <flags>` (train.py under the profiler):
    -> (exit status, its output, its log.jsonl records, the profiler's summary)."""
    out = os.path.join(s.work, name)
    summary = os.path.join(s.work, f"{name}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(ROOT, "tools", "profile_train.py"), "--json", summary, "--skip", str(skip),
               "--steps", str(steps), "--", *flags, "--out_dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if s.device.type == "cpu" else None
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the training process it started
        output, status = proc.communicate()[0], f"timeout after {timeout} s"
    if status != 0:  # the story goes to stderr
        print(f"---- {name}: exit status {status}\n" + "\n".join(output.splitlines()[-40:]), file=sys.stderr)
    log = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return status, output, records, json.load(open(summary)) if os.path.exists(summary) else {}


def why(status, output):
    """The run's own last line that says what went wrong, for a failed row."""
    lines = [line for line in output.splitlines() if line.startswith("error:") or "Error" in line]
    return f"exit status {status}: " + (lines[-1].strip()[:100] if lines else "see stderr")


def saved_step(s, name):
    """The step of the run's checkpoint (memory-mapped: a ViT-B checkpoint is a gigabyte), or None."""
    path = os.path.join(s.work, name, "ckpt.pt")
    return torch.load(path, mmap=True, weights_only=True)["step"] if os.path.exists(path) else None


def last_loss(records):
    losses = [v for r in records if "loss" in r for v in r["loss"].values()]
    return losses[-1] if losses else math.nan


def check_torchrun(s):
    """Four runs of train.py on the demo sets at the model's size, images 4x the clips as in the cover mix; the
    speed of two of them into s.speed."""
    cuda = s.device.type == "cuda"
    total, stop_at, eval_at = (40, 20, 20) if cuda else (4, 2, 2)
    workers = max(1, min(12, (os.cpu_count() or 4) - 2)) if cuda else 1
    flags = ["--recipe", "cover", "--datasets", "demo_kinetics,demo_imagenet", "--ddp", "--data_dir",
             os.path.join(s.work, "data"), "--model", "demo" if s.quick else "base", "--img_size",
             str(s.cfg.img_size), "--frames", str(s.cfg.frames), "--batch_size", str(s.batch), "--warmup_steps", "5",
             "--dataset_batch_size", f"demo_imagenet={4 * s.batch}", "--max_steps", str(total), "--eval_every", "0",
             "--final_eval", "none", "--workers", str(workers), "--device", str(s.device),
             "--log_every", "10" if cuda else "1"]  # a log reads the step's loss at once: 1 in 10 on a GPU
    timeout = 300 if cuda else 600  # compiling ViT-B takes minutes; a CPU shared with others may take them too
    backend = "nccl" if cuda else "gloo"
    rows = []

    status, output, records, summary = torchrun(s, "eager", flags + ["--stop_at", str(stop_at)], timeout=timeout)
    ok = status == 0 and saved_step(s, "eager") == stop_at and summary.get("backend") == backend
    detail = f"{summary.get('backend')} group, DDP for 1 process, steps 0-{stop_at}, SGD, drop path 0.1, bf16"
    rows.append(row("torchrun eager", f"loss {last_loss(records):.4f}" if ok else "failed",
                    detail if ok else why(status, output), ok))

    # the same command again resumes; its steps after a warm-up are profiled
    skip, steps = (8, 10) if cuda else (0, 1)
    status, output, records, summary = torchrun(s, "eager", flags, skip, steps, timeout)
    resumed = f"resuming from {os.path.join(s.work, 'eager', 'ckpt.pt')} (step {stop_at})" in output
    ok = status == 0 and resumed and saved_step(s, "eager") == total and math.isfinite(last_loss(records))
    rows.append(row("torchrun resume", f"loss {last_loss(records):.4f}" if ok else "failed",
                    f"steps {stop_at}-{total} from the checkpoint" if ok else why(status, output), ok))
    s.speed["eager"] = speed_numbers(records, summary, after=stop_at)

    # --compile: after the first steps (a graph each for clips and images), a validation of a fixed subset
    # (evaluation runs eager) that must not recompile, then the profiled steps
    skip = eval_at + 2 if cuda else eval_at
    compile_flags = ["--compile", s.compile_backend, "--eval_every", str(eval_at), "--val_samples", "64"]
    status, output, records, summary = torchrun(s, "compile", flags + compile_flags, skip, steps, 2 * timeout)
    counts = next((r["compile"] for r in reversed(records) if "compile" in r), {})
    validated = any("val" in r for r in records)
    ok = (status == 0 and saved_step(s, "compile") == total and validated and counts.get("graph_breaks") == 0
          and counts.get("recompiles") == 1)  # the second input kind's graph, nothing more
    rows.append(row("torchrun compile", f"loss {last_loss(records):.4f}" if status == 0 else "failed",
                    f"{counts.get('graphs')} graphs, {counts.get('recompiles')} recompile(s), "
                    f"{counts.get('graph_breaks')} graph breaks; validated mid-run: {validated}"
                    if status == 0 else why(status, output), ok))
    s.speed["compile"] = speed_numbers(records, summary, after=0)

    accum = ["--grad_accum", "2", "--batch_size", str(2 * s.batch), "--dataset_batch_size",
             f"demo_imagenet={8 * s.batch}", "--max_steps", "2"]
    status, output, records, _ = torchrun(s, "accum", flags + accum, timeout=timeout)
    ok = status == 0 and saved_step(s, "accum") == 2 and math.isfinite(last_loss(records))
    rows.append(row("torchrun grad_accum 2", f"loss {last_loss(records):.4f}" if ok else "failed",
                    f"{s.batch} clips a micro-step, DDP's no_sync on the first" if ok else why(status, output), ok))
    return rows + speed_rows(s.speed, cuda)


def speed_numbers(records, summary, after):
    """Step time, GPU idle share and kernels a step (the profiler), MFU and data wait (train.py's meter, the
    median over the run's log windows after its first, which holds the start), peak memory."""
    windows = [r for r in records if "mfu" in r and r["step"] > after][1:]
    numbers = {k: summary.get(k) for k in ("step_ms", "gpu_idle", "kernels_per_step", "peak_memory_gib")}
    for key in ("mfu", "data_wait"):
        numbers[key] = statistics.median(r[key] for r in windows) if windows else None
    return numbers


def speed_rows(speed, cuda):
    rows = []
    for name, n in speed.items():
        if n.get("step_ms") is None:
            rows.append(row(f"speed {name}", "no profile", "the run did not reach its profiled steps"))
            continue
        detail = f"MFU {fmt(n['mfu'], '.1%')}, data wait {fmt(n['data_wait'], '.0%')}"
        if cuda:
            detail += (f", GPU idle {fmt(n['gpu_idle'], '.0%')}, {fmt(n['kernels_per_step'], '.0f')} kernels a step, "
                       f"peak {fmt(n['peak_memory_gib'], '.1f')} GiB")
        rows.append(row(f"speed {name}", f"{n['step_ms']:.1f} ms/step", detail))
    eager, compiled = (speed.get(k, {}).get("step_ms") for k in ("eager", "compile"))
    if not cuda:
        rows.append(row("compile as the cover default", "no verdict on the CPU", "aot_eager says nothing of speed"))
    elif eager and compiled:
        faster = eager / compiled
        verdict = "make it the default" if faster >= SPEEDUP_FOR_DEFAULT else "keep it opt-in"
        rows.append(row("compile as the cover default", verdict, f"compiled steps {faster:.2f}x as fast as eager"))
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


# ---- batch: the largest image batch that trains

def check_image_batch(s):
    if s.device.type != "cuda":
        return [row("largest image batch", "skipped on CPU")]
    cfg = dataclasses.replace(s.cfg, drop_path=0.0)
    # more images than this put more than SDPA_MAX_BATCH sequences into one temporal attention call
    limit = M.SDPA_MAX_BATCH // (cfg.img_size // cfg.patch_size) ** 2
    model = make_model(cfg, s.device)
    model.grad_checkpointing = True
    optimizer = sgd(model)
    largest, n = 0, IMAGE_BATCHES[0]
    while n <= IMAGE_BATCHES[1]:
        x, y = make_batch(cfg, s.device, "image", n)
        try:
            train_step(model, optimizer, x, y, "image")
        except torch.cuda.OutOfMemoryError:
            break
        largest, n = n, 2 * n
    del model, optimizer, x, y
    torch.cuda.empty_cache()
    result = f"{largest} images" + (" (the cap)" if largest == IMAGE_BATCHES[1] else "")
    past = "past" if largest > limit else "not past"
    detail = f"grad checkpointing; {past} {limit}, where temporal attention would pass flash's limit"
    return [row("largest image batch", result, detail, largest > 0)]


# ---- the table

def print_table(rows):
    status = {True: "ok", False: "FAIL", None: "-"}
    lines = [("check", "result", "detail", "status")]
    lines += [(r["check"], r["result"], r["detail"], status[r["ok"]]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for i, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print("Δ: largest |difference| from the fp32 math backend over its largest |value|; "
          "grad Δ: relative L2 error of a parameter's gradient")


README_HEADER = ("| GPU | torch | eager step | compiled step | MFU eager / compiled | GPU idle eager / compiled "
                 "| peak memory | self-check |\n|---|---|---|---|---|---|---|---|")


def readme_row(table):
    """The README's GPU table row of one self-check run (its JSON): ViT-B 8x224, 8 clips or 32 images a step."""
    e, c = (table["speed"].get(k, {}) for k in ("eager", "compile"))
    return (f"| {table['device']} | {table['torch']} | {fmt(e.get('step_ms'), '.0f')} ms | "
            f"{fmt(c.get('step_ms'), '.0f')} ms | {fmt(e.get('mfu'), '.0%')} / {fmt(c.get('mfu'), '.0%')} | "
            f"{fmt(e.get('gpu_idle'), '.0%')} / {fmt(c.get('gpu_idle'), '.0%')} | "
            f"{fmt(max(e.get('peak_memory_gib') or 0, c.get('peak_memory_gib') or 0) or None, '.0f')} GiB | "
            f"{'passed' if table['passed'] else 'FAILED'} ({table['seconds'] / 60:.0f} min) |")


def main(argv=None):
    args = parse_args(argv)
    if args.readme:
        with open(args.readme) as f:
            print(README_HEADER + "\n" + readme_row(json.load(f)))
        return 0
    device = runtime.setup(args.device).device
    if device.type == "cpu":  # tiny tensors gain nothing from threads, which stall on cores shared by others
        torch.set_num_threads(1)
    quick = args.quick or device.type == "cpu"
    cfg = M.make_config("demo" if quick else "base", drop_path=0.1)  # the cover recipe's drop path
    work = args.work or tempfile.mkdtemp(prefix="selfcheck-")
    s = Setup(device, cfg, 2 if quick else 8, args.compile_backend or ("inductor" if device.type == "cuda"
                                                                          else "aot_eager"), quick, work)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"self-check | torch {torch.__version__} | {name} | model {'demo' if quick else 'base'} "
          f"{cfg.frames}x{cfg.img_size} | batch {s.batch} clips, {4 * s.batch} images | compile backend "
          f"{s.compile_backend} | runs in {work}")
    t0, rows = time.perf_counter(), []
    for section in (check_sdpa, check_bf16, check_grads, check_launches, check_torchrun, check_image_batch):
        t = time.perf_counter()
        try:
            rows += section(s)
        except Exception as e:  # a section that crashes is a failed row, and the others still run
            rows.append(error_row(section.__name__.removeprefix("check_"), e))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the torchrun runs need the GPU's memory
        print(f"{section.__name__.removeprefix('check_')}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    failed = [r["check"] for r in rows if r["ok"] is False]
    seconds = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "model": "demo" if quick else "base",
                       "compile_backend": s.compile_backend, "rows": rows, "speed": s.speed, "seconds": seconds,
                       "passed": not failed}, f, indent=1)
    print(f"self-check FAILED: {'; '.join(failed)}" if failed else f"self-check passed ({seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
