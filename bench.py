"""
Speed and memory of model.py and data.py against what users would pick instead. Every comparison
alternates A and B in one run (the machine may be noisy), for several rounds, and reports medians and
the ratio. Sections run on their own or all together; CUDA when present, else CPU.

  train   training step (forward + backward + AdamW) in bf16 autocast: ours vs Hugging Face
          TimesformerForVideoClassification with the same weights; clips/s and peak memory
  infer   multi-view inference (3 crops per video), bf16 weights, inference_mode: ours vs Hugging Face
  mfu     model FLOP/s of our training step over the bf16 GEMM peak measured in the same run
  data    clips/s per worker of data.py's Kinetics 8x32 train pipeline vs a PySlowFast-style PyAV
          decode, frame-exactness, decode-only time; images/s of the ImageNet path vs bare Pillow
  memory  activation and peak memory of a training step, with and without grad_checkpointing

  python bench.py --section train                  # ViT-B, 8x224, batch 2 (the paper's model)
  python bench.py --section train --depth 2        # same block shapes, 2 of the 12 blocks
  python bench.py --quick                          # every section on a tiny model, < 1 minute
Results: a table per section, and one JSON line per section (also appended to --json FILE).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import model as M

# Published dense bf16 peaks (TFLOP/s) for MFU against the spec sheet on CUDA; matched by name.
PUBLISHED_BF16_TFLOPS = {"H100 SXM": 989, "H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312,
                         "L40S": 362, "A10G": 70, "L4": 121, "RTX 4090": 165, "RTX 3090": 71, "V100": 125}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", default="all", choices=["all", "train", "infer", "mfu", "data", "memory"])
    p.add_argument("--model", default="base", help=f"model preset: {sorted(M.PRESETS)}")
    p.add_argument("--depth", type=int, default=None, help="override the preset's number of blocks")
    p.add_argument("--batch", type=int, default=2, help="clips per training step / videos per inference batch")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img_size", type=int, default=None, help="default: the preset's (224 for base)")
    p.add_argument("--views", type=int, default=3, help="spatial crops per video at inference")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16: autocast in training, bf16 weights at inference")
    p.add_argument("--rounds", type=int, default=3, help="alternations of A and B")
    p.add_argument("--steps", type=int, default=1, help="steps timed per side per round")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train and infer)")
    p.add_argument("--videos", nargs="*", default=None, help="videos for the data section (default /work/shared/videos/*)")
    p.add_argument("--clips", type=int, default=4, help="clips per video per round in the data section")
    p.add_argument("--images", type=int, default=200, help="JPEGs in the image benchmark")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny model and few rounds: a smoke test")
    p.add_argument("--_memory_probe", default=None, help=argparse.SUPPRESS)  # internal: one probe per process
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.frames, args.rounds, args.clips, args.images = "demo", 4, 2, 1, 10
    args.img_size = args.img_size or M.PRESETS[args.model].get("img_size", 224)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


# ------------------------------------------------------------------------------------------------
# helpers: timing, environment, reporting


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns, rounds, steps, device):
    """fns: {name: step function}. Each round runs every side `steps` times, in alternating order.
    -> ({name: median seconds per step}, {name: [seconds per step, one per round]})."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}, times


def machine(args):
    """The device and the library versions, for the table header and the JSON line."""
    import cv2
    import PIL
    import transformers

    name = torch.cuda.get_device_name() if args.device.type == "cuda" else \
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "commit": git.stdout.strip()}


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())


def report(args, section, config, rows, results):
    """rows: [(metric, ours, peer, ratio, target)] printed as a table; results: the JSON line."""
    info = machine(args)
    print(f"\n## {section}  ({', '.join(f'{k}={v}' for k, v in config.items())})")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("| metric | ours | peer | ratio | target |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(fmt(c) for c in row) + " |")
    line = json.dumps({"section": section, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                       "machine": info, "config": config, **results})
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")


def fmt(c):
    if not isinstance(c, float):
        return str(c)
    return f"{c:.0f}" if abs(c) >= 100 else f"{c:.3g}"


def model_config(args):
    overrides = {"frames": args.frames, "img_size": args.img_size}
    if args.depth:
        overrides["depth"] = args.depth
    return M.make_config(args.model, **overrides)


def build_pair(args, classes=400):
    """Hugging Face model with random weights, and ours loaded from its save_pretrained folder. No drop
    path on either side: transformers 5.x types TimesformerConfig.drop_path_rate as int."""
    import transformers

    cfg = model_config(args)
    cfg.drop_path = 0.0
    hf_cfg = transformers.TimesformerConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_frames=cfg.frames, hidden_size=cfg.width,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        layer_norm_eps=cfg.eps, num_labels=classes)
    torch.manual_seed(0)
    hf = transformers.TimesformerForVideoClassification(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = M.from_pretrained(tmp, verbose=False, drop_path=cfg.drop_path)
    return ours.to(args.device), hf.to(args.device), cfg


def clips(args, n, dtype=torch.float32):  # (n, C, T, H, W), fixed random values
    x = torch.randn(n, 3, args.frames, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    return x.to(args.device, dtype)


def train_step_fn(model, hf, args, ckpt=False):
    """One training step on a fixed batch. HF takes (B, T, C, H, W): made contiguous outside the timing."""
    x = clips(args, args.batch)
    x = x.transpose(1, 2).contiguous() if hf else x
    y = torch.arange(args.batch, device=args.device) % 400
    opt = torch.optim.AdamW(model.param_groups(0.05) if not hf else model.parameters(), lr=1e-4)
    model.train()
    if not hf:
        model.grad_checkpointing = ckpt
    fwd = torch.compile(model) if args.compile and not hf else model

    def forward_loss():
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            logits = fwd(pixel_values=x).logits if hf else fwd(x)
            return F.cross_entropy(logits.float(), y)

    def step():
        forward_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, forward_loss, opt


# ------------------------------------------------------------------------------------------------
# memory: CUDA allocator statistics, or on CPU the resident set of a fresh process per measurement


def memory_probe(args, impl, ckpt):
    """Memory of one training step after the optimizer state exists (AdamW stepped on zero grads).
    -> MB: 'activations' held between forward and backward, 'step_peak' above the state before the
    step (activations + grads + temporaries), 'total_peak' (everything, incl. weights and runtime)."""
    ours, hf, _ = build_pair(args)  # both, so both processes hold the same libraries
    model = hf if impl == "hf" else ours
    del ours, hf
    _, forward_loss, opt = train_step_fn(model, impl == "hf", args, ckpt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        current = torch.cuda.memory_allocated
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        current = lambda: _status_kb("VmRSS") * 1024  # noqa: E731
    base = current()
    loss = forward_loss()
    activations = current() - base
    loss.backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    mb = 2.0**-20
    return {"activations": activations * mb, "step_peak": (peak - base) * mb, "total_peak": peak * mb}


def _status_kb(field):
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(field + ":")).split()[1])


def measure_memory(args, probes):
    """[(impl, grad_checkpointing)] -> {probe: memory_probe's MB}. On CPU each probe runs in its own
    fresh process (all at once: memory is not timing), with glibc told to return every block >= 64 KiB
    to the OS on free (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors."""
    if args.device.type == "cuda":
        return {p: memory_probe(args, *p) for p in probes}
    argv = [f"--{k}={getattr(args, k)}" for k in ("model", "batch", "frames", "img_size", "dtype", "device")]
    argv += [f"--depth={args.depth}"] * bool(args.depth) + [f"--threads={args.threads}"] * bool(args.threads)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    procs = {(impl, ckpt): subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                                             f"--_memory_probe={impl},{int(ckpt)}"],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for impl, ckpt in probes}
    results = {}
    for probe, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory probe {probe} failed:\n{err[-3000:]}")
        results[probe] = json.loads(out.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------------------------------
# sections


def section_train(args):
    ours, hf, cfg = build_pair(args)
    steps = {"ours": train_step_fn(ours, False, args)[0], "hf": train_step_fn(hf, True, args)[0]}
    for f in steps.values():
        f()  # warm-up: optimizer state, allocator, compilation
    med, rounds = alternate(steps, args.rounds, args.steps, args.device)
    mem = {k[0]: v for k, v in measure_memory(args, [("ours", False), ("hf", False)]).items()}
    cps = {k: args.batch / v for k, v in med.items()}
    flops = 3 * 2 * ours.flops(args.frames, args.img_size) * args.batch / med["ours"]
    rows = [("train clips/s", cps["ours"], cps["hf"], cps["ours"] / cps["hf"], ">= 1.25"),
            ("step peak MB (activations + grads)", mem["ours"]["step_peak"], mem["hf"]["step_peak"],
             mem["ours"]["step_peak"] / mem["hf"]["step_peak"], "<= 0.8"),
            ("process peak MB (all)", mem["ours"]["total_peak"], mem["hf"]["total_peak"],
             mem["ours"]["total_peak"] / mem["hf"]["total_peak"], ""),
            ("achieved TFLOP/s (model FLOPs)", flops / 1e12, "", "", "")]
    report(args, "train", run_config(args, cfg), rows,
           {"clips_per_s": cps, "ratio": cps["ours"] / cps["hf"], "seconds_per_round": rounds, "memory_mb": mem})


def section_infer(args):
    ours, hf, cfg = build_pair(args)
    x = clips(args, args.batch * args.views)  # (videos * views, C, T, H, W): each video's views together
    x_hf = x.transpose(1, 2).contiguous()  # Hugging Face takes (B, T, C, H, W)
    with torch.inference_mode():
        same = (ours.eval()(x[:1]) - hf.eval()(pixel_values=x_hf[:1]).logits).abs().max().item()  # fp32
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        ours, hf, x, x_hf = ours.to(dtype), hf.to(dtype), x.to(dtype), x_hf.to(dtype)
        fwd = torch.compile(ours) if args.compile else ours

        def video_probs(logits):  # softmax averaged over each video's views
            return logits.float().softmax(-1).view(args.batch, args.views, -1).mean(1)

        fns = {"ours": lambda: video_probs(fwd(x)), "hf": lambda: video_probs(hf(pixel_values=x_hf).logits)}
        for f in fns.values():
            f()
        med, rounds = alternate(fns, args.rounds, args.steps, args.device)
    vps = {k: args.batch / v for k, v in med.items()}
    rows = [(f"videos/s ({args.views} views each)", vps["ours"], vps["hf"], vps["ours"] / vps["hf"], ">= 1.3"),
            ("views/s", vps["ours"] * args.views, vps["hf"] * args.views, "", ""),
            ("max |logit diff| in fp32, same weights", same, "", "", "")]
    report(args, "infer", {**run_config(args, cfg), "views": args.views}, rows,
           {"videos_per_s": vps, "ratio": vps["ours"] / vps["hf"], "seconds_per_round": rounds, "max_logit_diff": same})


def gemm_peak(args):
    """{name: timed GEMM}, FLOPs per call. On CPU PyTorch's bf16 GEMM speed depends on the operands'
    layout (up to 20x) and slows once the output outgrows the cache: every layout is tried on a small
    product, then the best one is timed large, whole and in 512-row blocks. CUDA: one 8192^3 GEMM."""
    def gemm(m, k, n, layout, rows=None):  # A, B stored row-major (N) or transposed (T)
        a = torch.randn(m, k) if layout[0] == "N" else torch.randn(k, m).t()
        b = torch.randn(k, n) if layout[1] == "N" else torch.randn(n, k).t()
        a, b = a.to(args.device, torch.bfloat16), b.to(args.device, torch.bfloat16)
        return lambda: [a[i : i + (rows or m)] @ b for i in range(0, m, rows or m)]

    if args.device.type == "cuda":
        return {"8192^3": gemm(8192, 8192, 8192, "NN")}, 2 * 8192**3
    s = 256 if args.quick else 1024
    rates = {layout: alternate({0: gemm(s, s, s, layout)}, 1, 1, args.device)[0][0] for layout in ("NN", "NT", "TN", "TT")}
    print(f"bf16 GEMM GFLOP/s by layout of A, B (N: row-major, T: transposed), {s}^3: "
          + ", ".join(f"{k} {2 * s**3 / t / 1e9:.1f}" for k, t in rates.items()))
    best = min(rates, key=rates.get)
    m, k, n = (512, 256, 256) if args.quick else (4096, 1024, 1024)
    return {f"{best} {m}x{k}x{n}": gemm(m, k, n, best), f"{best} {m}x{k}x{n} in 512-row blocks": gemm(m, k, n, best, 512)}, 2 * m * k * n


def section_mfu(args):
    ours, hf, cfg = build_pair(args)
    del hf
    gemms, gemm_flop = gemm_peak(args)
    fns = {"ours train step": train_step_fn(ours, False, args)[0], **gemms}
    for f in fns.values():
        f()
    med, rounds = alternate(fns, args.rounds, args.steps, args.device)
    peaks = {k: gemm_flop / v for k, v in med.items() if k in gemms}
    peak_name = max(peaks, key=peaks.get)
    achieved = 3 * 2 * ours.flops(args.frames, args.img_size) * args.batch / med["ours train step"]
    rows = [("model TFLOP/s (train, 3 x 2 x MACs)", achieved / 1e12, "", "", ""),
            (f"measured bf16 GEMM peak TFLOP/s ({peak_name})", peaks[peak_name] / 1e12, "", "", ""),
            ("MFU vs measured peak", achieved / peaks[peak_name], "", "", ">= 0.75")]
    results = {"achieved_tflops": achieved / 1e12, "gemm_peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
               "mfu_measured": achieved / peaks[peak_name], "seconds_per_round": rounds}
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name()
        spec = next((v for k, v in PUBLISHED_BF16_TFLOPS.items() if k in name), None)
        if spec:
            rows.append((f"MFU vs published bf16 peak ({spec} TFLOP/s)", achieved / 1e12 / spec, "", "", ""))
            results["mfu_published"] = achieved / 1e12 / spec
    report(args, "mfu", run_config(args, cfg), rows, results)


def section_memory(args):
    """Ours with and without grad_checkpointing (the Hugging Face comparison is in section train)."""
    cfg = model_config(args)
    mem = measure_memory(args, [("ours", False), ("ours", True)])
    off, on = mem[("ours", False)], mem[("ours", True)]
    rows = [("activations MB (held after forward), off / on", off["activations"], on["activations"],
             off["activations"] / on["activations"], ">= 3"),
            ("step peak MB (activations + grads + temporaries), off / on", off["step_peak"], on["step_peak"],
             off["step_peak"] / on["step_peak"], ""),
            ("process peak MB (all), off / on", off["total_peak"], on["total_peak"], off["total_peak"] / on["total_peak"], "")]
    how = "cuda max_memory_allocated" if args.device.type == "cuda" else "VmRSS/VmHWM of a fresh process per probe"
    report(args, "memory", {**run_config(args, cfg), "measured_by": how}, rows, {"off": off, "grad_checkpointing": on})


def run_config(args, cfg):
    return {"model": f"{args.model} (width {cfg.width}, depth {cfg.depth})", "batch": args.batch,
            "frames": cfg.frames, "img_size": cfg.img_size, "dtype": args.dtype, "rounds": args.rounds,
            "steps": args.steps, "device": args.device.type, "compile": args.compile}


def pyav_clip(path, indices, convert=True):
    """The reference decoder, as PySlowFast uses PyAV: seek to the keyframe before the clip, decode to
    its end, convert every frame of that window to RGB, keep the ones sampled. One decoder thread.
    convert=False: the same seek and decode without the RGB conversions (returns None): where its time goes."""
    import av

    wanted, out = set(indices.tolist()), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps, tb = float(stream.average_rate), float(stream.time_base)
        t0 = stream.start_time or 0
        container.seek(t0 + int(indices.min() / fps / tb), backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            i = round((frame.pts - t0) * tb * fps)  # decode-order index of this frame
            if i < indices.min():
                continue
            if not convert:
                if i >= indices.max():
                    return None
                continue
            rgb = frame.to_ndarray(format="rgb24")  # PySlowFast: frame.to_rgb().to_ndarray(), every frame
            if i in wanted:
                out[i] = rgb
            if i >= indices.max():
                break
    return np.stack([out[i] for i in indices.tolist()])


def section_data(args):
    import cv2
    import data
    from PIL import Image

    cv2.setNumThreads(1)  # what one DataLoader worker gets: one thread
    torch.set_num_threads(1)
    videos = args.videos or sorted(glob.glob("/work/shared/videos/*"))
    if not videos:
        raise SystemExit("no videos: pass --videos FILE ...")
    spec, T, S = data.SPECS["k400"], args.frames, args.img_size  # Kinetics: 32 frames apart at 30 fps
    jobs = []  # (video, frame indices, seed): the same clips for every side
    for v in videos:
        n, fps = data.video_info(v)
        jobs += [(v, data.kinetics_indices(n, T, spec.rate, fps, rng=np.random.default_rng(s)), s) for s in range(args.clips)]

    def augment(frames, seed):  # the spatial part of ClipDataset._load_train, with data.py's helpers
        rng = np.random.default_rng(seed)
        x = data._crop_resize(frames, data.train_video_box(*frames.shape[1:3], S, rng), S)
        x = np.ascontiguousarray(x[:, :, ::-1]) if rng.random() < 0.5 else x
        return torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (C, T, S, S) uint8

    def decode_only(path, idx):  # decode every frame up to the clip's last, no colour conversion
        cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        for _ in range(int(idx.max()) + 1):
            cap.grab()
        cap.release()

    ds = data.ClipDataset(spec, "train", [(v, 0) for v in videos], ["x"], {}, frames=T, img_size=S, train=True)
    fns = {"ours": lambda: [augment(data.read_video(v, idx), s) for v, idx, s in jobs],
           "pyav": lambda: [augment(pyav_clip(v, idx), s) for v, idx, s in jobs],
           "decode only": lambda: [decode_only(v, idx) for v, idx, s in jobs],
           "pyav decode only": lambda: [pyav_clip(v, idx, convert=False) for v, idx, s in jobs],
           "ClipDataset item": lambda: [ds[(i % len(videos), i)] for i in range(len(jobs))]}
    med, rounds = alternate(fns, args.rounds, 1, torch.device("cpu"))
    cps = {k: len(jobs) / v for k, v in med.items()}

    # Frame-exactness: the same indices through both decoders. Both convert YUV -> RGB with swscale; if
    # the pixels ever differ, the selection is checked instead: each frame's nearest PyAV frame.
    exact, max_diff = True, 0
    for v, idx, _ in jobs:
        mine, ref = data.read_video(v, idx).astype(np.int16), pyav_clip(v, idx)
        max_diff = max(max_diff, int(np.abs(mine - ref).max()))
        if max_diff:
            span = np.arange(idx.min(), idx.max() + 1)
            nearest = [span[np.argmin([np.abs(f - g).mean() for g in pyav_clip(v, span)])] for f in mine]
            exact &= nearest == idx.tolist()

    with tempfile.TemporaryDirectory() as folder:
        images = make_jpegs(videos, args.images, folder)
        ids = data.ClipDataset(data.SPECS["in1k"], "train", [(p, 0) for p in images], ["x"], {}, img_size=S)
        ifns = {"ours images": lambda: [ids[(i, i)] for i in range(len(images))],
                "pillow decode": lambda: [np.asarray(Image.open(p).convert("RGB")) for p in images]}
        imed, irounds = alternate(ifns, args.rounds, 1, torch.device("cpu"))
    ips = {k: len(images) / v for k, v in imed.items()}
    torch.set_num_threads(args.threads or os.cpu_count())
    rows = [(f"clips/s per worker (Kinetics {T}x{spec.rate} train)", cps["ours"], cps["pyav"], cps["ours"] / cps["pyav"], ">= 2"),
            ("clips/s, ClipDataset item / decode only", cps["ClipDataset item"], cps["decode only"], "", ""),
            ("time / time of decoding the frames the clip spans", med["ours"] / med["decode only"], "", "", "<= 1.25"),
            ("decode only (no RGB conversion), clips/s: OpenCV from frame 0 / PyAV from the keyframe before the clip",
             cps["decode only"], cps["pyav decode only"], cps["decode only"] / cps["pyav decode only"], ""),
            ("ceiling of ours / PyAV for a reader that never seeks: PyAV time / our decode-only time",
             med["pyav"] / med["decode only"], "", "", ""),
            ("same frames as PyAV", str(exact), "", "", "True"),
            ("max |pixel diff| vs PyAV rgb24", max_diff, "", "", ""),
            ("images/s: load_image + train transform / Pillow decode", ips["ours images"], ips["pillow decode"],
             ips["ours images"] / ips["pillow decode"], ">= 0.8")]
    config = {"videos": [os.path.basename(v) for v in videos], "clips_per_video": args.clips, "frames": T, "img_size": S,
              "rate": spec.rate, "images": len(images), "rounds": args.rounds, "threads": 1}
    report(args, "data", config, rows, {"clips_per_s": cps, "images_per_s": ips, "frame_exact": exact,
                                        "max_pixel_diff": max_diff, "seconds_per_round": {**rounds, **irounds}})


def make_jpegs(videos, n, folder, size=(500, 375)):
    """n ImageNet-sized JPEGs (quality 90) from the videos' frames."""
    import cv2
    import data
    from PIL import Image

    frames = [f for v in videos for f in data.read_video(v, np.arange(0, 24 * (n // len(videos) + 1), 24) % data.video_info(v)[0])]
    for k, f in enumerate(frames[:n]):
        Image.fromarray(cv2.resize(f, size, interpolation=cv2.INTER_AREA)).save(os.path.join(folder, f"{k}.jpg"), quality=90)
    return [os.path.join(folder, f"{k}.jpg") for k in range(min(n, len(frames)))]


SECTIONS = {"train": section_train, "infer": section_infer, "mfu": section_mfu, "data": section_data,
            "memory": section_memory}

if __name__ == "__main__":
    args = parse_args()
    torch.set_num_threads(args.threads or os.cpu_count())
    if args._memory_probe:  # a child of measure_memory: one probe, one JSON line
        impl, ckpt = args._memory_probe.split(",")
        print(json.dumps(memory_probe(args, impl, bool(int(ckpt)))))
        sys.exit()
    for name in SECTIONS if args.section == "all" else [args.section]:
        SECTIONS[name](args)
