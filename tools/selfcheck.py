"""
Self-check of a machine for training this model; run it on a new GPU, driver or PyTorch version.

  sdpa   the spatial (B*T, heads, 1+N, head_dim) and temporal (B*N, heads, T, head_dim) attention shapes
         under each scaled-dot-product-attention backend, forward and backward: whether it runs, how far
         its output and q/k/v gradients are from the math backend in fp32, which one PyTorch picks
  train  one bf16 train step on video clips and one on images, plain (eager), with --compile, with
         --grad_checkpoint and with both, from the same weights and inputs: a finite loss, and the
         gradients of the plain step
  speed  step time, MFU and peak memory per clip of the video step of each variant
  batch  the largest image batch that trains, and whether it is past the batch at which temporal
         attention on images would have exceeded flash attention's limit of sequences per call

It prints one table, and exits 1 if a row failed. On CUDA it checks ViT-B 8x224 in bf16 (under 3 minutes,
most of it compiling); on the CPU, or with --quick, a tiny model in well under a minute, so that CI
covers the script itself.

    python tools/selfcheck.py                        # ViT-B 8x224 on the GPU
    python tools/selfcheck.py --quick                # the tiny model (always on the CPU)
    python tools/selfcheck.py --json selfcheck.json  # the table as JSON too
"""

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

# the project's modules are in the folder above, which is not on the path when this runs as a script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

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
VARIANTS = {"plain": (False, False), "compile": (True, False), "ckpt": (False, True),
            "compile+ckpt": (True, True)}  # name: (compile, grad_checkpoint)
HEADS = {"video": 400, "image": 1000}
TIMED_STEPS = 3
IMAGE_BATCHES = (64, 8192)  # the search doubles from the first, up to the second to bound its time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="a tiny model instead of ViT-B 8x224")
    p.add_argument("--json", help="also write the table to this file")
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


# ---- sdpa: each backend forced on the model's two attention shapes

def attend(q, k, v, grad_out, backend=None):
    """[output, dq, dk, dv] of SDPA with `backend` forced, or with PyTorch's choice for None."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def unavailable_reason(caught):
    """Why the forced backend did not run, from PyTorch's warnings (the others say 'runtime disabled')."""
    for w in caught:
        text = str(w.message).split(" (Triggered internally")[0].strip()
        if text and "runtime disabled" not in text and not text.endswith("because:"):
            return text[:90]
    return ""


def sdpa_row(check, qkvg, backend, reference, outputs):
    """-> (the row of one backend, its output or None); `outputs` holds the outputs of the forced ones."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = attend(*qkvg, backend)
        except RuntimeError as e:
            if any(s in str(e) for s in NOT_AVAILABLE):
                return row(check, "not available", unavailable_reason(caught)), None
            return error_row(check, e), None
    errors = [((x.float() - r).abs().max() / r.abs().max()).item() for x, r in zip(got, reference)]
    ok = all(e <= SDPA_TOL[qkvg[0].dtype] for e in errors)  # False for NaN too
    result = "runs"
    if backend is None:  # PyTorch's choice is the forced backend that gave the same output, bit for bit
        same = [name for name, out in outputs.items() if out is not None and torch.equal(out, got[0])]
        result = f"runs (= {same[0]})" if same else "runs (unidentified)"
    return row(check, result, "Δ out {:.1e}  dq {:.1e}  dk {:.1e}  dv {:.1e}".format(*errors), ok), got[0]


def check_sdpa(device, cfg, batch):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU kernels are checked in fp32
    n, heads, head_dim = (cfg.img_size // cfg.patch_size) ** 2, cfg.num_heads, cfg.width // cfg.num_heads
    shapes = {"spatial": (batch * cfg.frames, heads, 1 + n, head_dim),
              "temporal": (batch * n, heads, cfg.frames, head_dim)}
    rows = []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        qkvg = [torch.randn(shape, device=device).to(dtype) for _ in range(4)]  # q, k, v, grad of output
        reference = attend(*(t.float() for t in qkvg), SDPBackend.MATH)
        outputs = {}
        for label, backend in [*BACKENDS.items(), ("default", None)]:
            check = f"sdpa {name} {tuple(shape)} {label}"
            line, outputs[label] = sdpa_row(check, qkvg, backend, reference, outputs)
            rows.append(line)
    return rows


# ---- train: one bf16 step per dataset kind and variant, compared with the plain step

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


def build_variant(base, compiled, ckpt, device, backend="inductor"):
    model = copy.deepcopy(base)
    model.grad_checkpointing = ckpt
    if compiled:
        model.compile_trunk(backend=backend)  # as train.py --compile does
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")


def train_step(model, optimizer, x, y, head):
    """One bf16 training step as train.py takes it; the gradients stay in .grad until the next step."""
    optimizer.zero_grad(set_to_none=True)
    with runtime.autocast(x.device, torch.bfloat16):
        logits = model(x, head=head)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    optimizer.step()
    return loss.item()


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


def check_train(base, cfg, device, batch, peak, backend):
    """-> (rows of the train steps, rows of the video step's speed)."""
    rows, speed = [], []
    for kind in ("video", "image"):
        x, y = make_batch(cfg, device, kind, batch if kind == "video" else 4 * batch)  # see data.image_spec
        reference = None
        for variant, (compiled, ckpt) in VARIANTS.items():
            check = f"train {kind} {variant}"
            try:
                model, optimizer = build_variant(base, compiled, ckpt, device, backend)
                loss = train_step(model, optimizer, x, y, kind)
            except Exception as e:  # a variant that crashes is a failed row, and the others still run
                rows.append(error_row(check, e))
                continue
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            if variant == "plain":
                reference, detail, ok = grads, "the reference", math.isfinite(loss)
            elif reference is None:
                detail, ok = "no plain step to compare with", math.isfinite(loss)
            else:
                error, name = gradient_error(grads, reference)
                detail = f"grad Δ {error:.1e} vs plain (largest: {name})"
                ok = math.isfinite(loss) and error <= GRAD_TOL
            rows.append(row(check, f"loss {loss:.4f}", detail, ok))
            if kind == "video":
                speed.append(measure_speed(model, optimizer, x, y, variant, peak))
    return rows, speed


def measure_speed(model, optimizer, x, y, variant, peak):
    cuda = x.device.type == "cuda"
    train_step(model, optimizer, x, y, "video")  # warm-up: kernel choice, allocator, compiled graphs
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # weights, optimizer state and gradients, whatever the batch
    times = []
    for _ in range(TIMED_STEPS):
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, "video")  # its loss.item() waits for the GPU
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    mfu = 6 * model.flops(x.shape[2], x.shape[-1]) * len(x) / step / peak  # 3 passes, 2 FLOP per mult-add
    memory = "memory not measured on CPU"
    if cuda:
        memory = f"{(torch.cuda.max_memory_allocated() - held) / len(x) / 2**30:.2f} GiB per clip"
    return row(f"speed video {variant}", f"{1000 * step:.1f} ms/step",
               f"MFU {100 * mfu:.1f}%, {memory} (batch {len(x)})")


# ---- batch: the largest image batch that trains

def check_image_batch(base, cfg, device):
    if device.type != "cuda":
        return row("largest image batch", "skipped on CPU")
    # more images than this put more than SDPA_MAX_BATCH sequences into one temporal attention call
    limit = M.SDPA_MAX_BATCH // (cfg.img_size // cfg.patch_size) ** 2
    model, optimizer = build_variant(base, compiled=False, ckpt=True, device=device)
    largest, n = 0, IMAGE_BATCHES[0]
    while n <= IMAGE_BATCHES[1]:
        x, y = make_batch(cfg, device, "image", n)
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
    return row("largest image batch", result, detail, largest > 0)


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


def main(argv=None):
    args = parse_args(argv)
    device = runtime.setup(args.device).device
    if device.type == "cpu":  # tiny tensors gain nothing from threads, which stall on cores shared by others
        torch.set_num_threads(1)
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    preset = "demo" if args.quick or device.type == "cpu" else "base"
    # no stochastic depth: compiled code draws other random numbers than eager, and the variants must agree
    cfg = M.make_config(preset, drop_path=0.0)
    batch = 2 if preset == "demo" else 8
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"self-check | torch {torch.__version__} | {name} | model {preset} {cfg.frames}x{cfg.img_size} | "
          f"batch {batch} clips, {4 * batch} images | compile backend {backend}")
    t0 = time.perf_counter()
    rows = check_sdpa(device, cfg, batch)
    base = make_model(cfg, device)
    peak = runtime.peak_flops(device, torch.bfloat16)
    train_rows, speed_rows = check_train(base, cfg, device, batch, peak, backend)
    torch.compiler.reset()  # lets go of the compiled graphs and the memory they hold
    rows += train_rows + speed_rows
    try:
        rows.append(check_image_batch(base, cfg, device))
    except Exception as e:  # an error other than running out of memory, e.g. a kernel's launch limit
        rows.append(error_row("largest image batch", e))
    print_table(rows)
    failed = [r["check"] for r in rows if r["ok"] is False]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "model": preset,
                       "compile_backend": backend, "rows": rows, "passed": not failed}, f, indent=1)
    seconds = time.perf_counter() - t0
    print(f"self-check FAILED: {'; '.join(failed)}" if failed else f"self-check passed ({seconds:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
