"""
Speed and memory of model.py and data.py against what users would pick instead. Every comparison
alternates A and B in one run (the machine may be noisy), for several rounds, and reports medians (the
data sections: the fastest round, what one core does for one worker) and the ratio. Sections run on their
own or all together; CUDA when present, else CPU.

  train   training step (forward + backward + AdamW): ours vs Hugging Face
          TimesformerForVideoClassification with the same weights; clips/s and peak memory
  infer   multi-view inference (3 crops per video), inference_mode: ours vs Hugging Face
  mfu     model FLOP/s of our training step over the peak: the published one on known GPUs, on CPU
          one plain GEMM measured in the same run
  data    clips/s per worker of data.py's train item at R = 1, 2, 4 clips per decode (--num_sample),
          with PyAV's reader and with OpenCV's, vs a PySlowFast-style PyAV decode and PyAV keyframe
          seek (one decode per clip): Kinetics 8x32 clips as downloaded, prepared with a keyframe every
          16 frames and with tools/prepare_videos.py's defaults; SSv2-like webm as downloaded and
          prepared; frame-exactness; images/s of the ImageNet path vs bare Pillow; the workers an
          H100 needs at 40% MFU, for K400 alone and for the cover recipe's mix
  prepare the same per-worker rates (and bit rates) on tools/prepare_videos.py's output under
          other options: keyframe interval 4 / 8 / 16, short side, CRF
  memory  activation and peak memory of a training step, with and without grad_checkpointing
  long    our train item on a 10-minute video (as downloaded, and prepared), with the packet lists each
          process keeps (video.KNOWN) and with every read listing the packets again; the bytes kept per
          frame; with --before FILE also the reader of FILE (git show REV:video.py > FILE)

  python tools/bench.py --section train infer           # ViT-B, 8x224, batch 2 (the paper's model)
  python tools/bench.py --section train --depth 2       # same block shapes, 2 of the 12 blocks
  python tools/bench.py --section data                  # generated Kinetics-like clips, 1280x720
  python tools/bench.py --section data --videos a.mp4 b.mp4   # and your videos, as they are and prepared
  python tools/bench.py --quick                         # every section on a tiny model, < 1 minute
Precision: fp32 on CPU, bf16 on CUDA (autocast in training, bf16 weights at inference); --dtype sets it.
The data section needs `pip install imageio-ffmpeg av` (it writes its clips with FFmpeg and compares
with PyAV); its generated clips are kept in <tmp>/cover_bench_videos for the next run.
Results: a table per section, and one JSON line per section (also appended to --json FILE).
"""

import argparse
import datetime
import functools
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules live in the parent folder

import model as M  # noqa: E402
import runtime  # noqa: E402

CLIP_SECONDS, CLIP_FPS = 10, 25  # a Kinetics clip
GEN_VERSION = 1  # part of the generated clips' names: bump when make_clip changes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.strip().split("\n\n", 1)[1])
    p.add_argument("--section", nargs="+", default=["all"], choices=["all", *SECTIONS],
                   help="one or more sections (default: all)")
    p.add_argument("--model", default="base", help=f"model preset: {sorted(M.PRESETS)}")
    p.add_argument("--depth", type=int, default=None, help="override the preset's number of blocks")
    p.add_argument("--batch", type=int, default=2,
                   help="clips per training step / videos per inference batch")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img_size", type=int, default=None, help="default: the preset's (224 for base)")
    p.add_argument("--views", type=int, default=3, help="spatial crops per video at inference")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rounds", type=int, default=3, help="alternations of A and B")
    p.add_argument("--steps", type=int, default=1, help="steps timed per side per round")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train and infer)")
    p.add_argument("--videos", nargs="+", default=None,
                   help="videos for the data section (default: Kinetics-like clips it writes itself)")
    p.add_argument("--clips", type=int, default=2, help="clips per video per round in the data section")
    p.add_argument("--images", type=int, default=200, help="JPEGs in the image benchmark")
    p.add_argument("--before", default=None, help="long section: a video.py of another commit, timed beside")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", default=None, help="append the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny model, small clips, few rounds: a smoke test")
    p.add_argument("--_memory_probe", default=None, help=argparse.SUPPRESS)  # internal: one probe per process
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.frames, args.rounds, args.clips, args.images = "demo", 4, 2, 1, 10
    args.img_size = args.img_size or M.PRESETS[args.model].get("img_size", 224)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    return args


# ------------------------------------------------------------------------------------------------
# helpers: timing, environment, reporting


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns, rounds, steps, device, stat=statistics.median):
    """fns: {name: step function}. Each round runs every side `steps` times, in alternating order.
    -> ({name: stat (median) of the seconds per step}, {name: [seconds per step, one per round]})."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: stat(v) for k, v in times.items()}, times


def machine(args):
    """The device and the library versions, for the table header and the JSON line."""
    import cv2
    import PIL
    import transformers

    name = torch.cuda.get_device_name() if args.device.type == "cuda" else \
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "commit": git.stdout.strip()}


def cpu_name():
    with open("/proc/cpuinfo") as f:
        names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        return next(names, platform.processor())


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


def ratio(a, b):
    return a / b if b else float("nan")


# ------------------------------------------------------------------------------------------------
# models


def model_config(args):
    overrides = {"frames": args.frames, "img_size": args.img_size}
    if args.depth:
        overrides["depth"] = args.depth
    return M.make_config(args.model, **overrides)


def build_pair(args, classes=400):
    """Hugging Face model with random weights, and ours loaded from its save_pretrained folder. No drop
    path on either side: transformers 5.x types TimesformerConfig.drop_path_rate as int."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar is noise in the tables
    cfg = model_config(args)
    cfg.drop_path = 0.0
    hf_cfg = transformers.TimesformerConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_frames=cfg.frames, hidden_size=cfg.width,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.width * cfg.mlp_ratio), layer_norm_eps=cfg.eps, num_labels=classes)
    torch.manual_seed(0)
    hf = transformers.TimesformerForVideoClassification(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = M.TimeSformer.from_pretrained(tmp, verbose=False, drop_path=cfg.drop_path)
    return ours.to(args.device), hf.to(args.device), cfg


def dtype_of(args):
    return runtime.DTYPES[args.dtype]


def clips(args, n, dtype=torch.float32):  # (n, C, T, H, W), fixed random values
    shape = (n, 3, args.frames, args.img_size, args.img_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
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
        with runtime.autocast(args.device, dtype_of(args)):
            logits = fwd(pixel_values=x).logits if hf else fwd(x)
            return F.cross_entropy(logits.float(), y)

    def step():
        forward_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, forward_loss, opt


def run_config(args, cfg):
    return {"model": f"{args.model} (width {cfg.width}, depth {cfg.depth})", "batch": args.batch,
            "frames": cfg.frames, "img_size": cfg.img_size, "dtype": args.dtype, "rounds": args.rounds,
            "steps": args.steps, "device": args.device.type, "compile": args.compile}


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
        current = lambda: status_kb("VmRSS") * 1024  # noqa: E731
    base = current()
    loss = forward_loss()
    activations = current() - base
    loss.backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
    mb = 2.0**-20
    return {"activations": activations * mb, "step_peak": (peak - base) * mb, "total_peak": peak * mb}


def status_kb(field):
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
    procs = {(impl, ckpt): subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, f"--_memory_probe={impl},{int(ckpt)}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for impl, ckpt in probes}
    results = {}
    for probe, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory probe {probe} failed:\n{err[-3000:]}")
        results[probe] = json.loads(out.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------------------------------
# model sections


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
           {"clips_per_s": cps, "ratio": cps["ours"] / cps["hf"], "seconds_per_round": rounds,
            "memory_mb": mem})


def section_infer(args):
    ours, hf, cfg = build_pair(args)
    x = clips(args, args.batch * args.views)  # (videos * views, C, T, H, W): each video's views together
    x_hf = x.transpose(1, 2).contiguous()  # Hugging Face takes (B, T, C, H, W)
    with torch.inference_mode():
        same = (ours.eval()(x[:1]) - hf.eval()(pixel_values=x_hf[:1]).logits).abs().max().item()  # fp32
        dtype = dtype_of(args)
        ours, hf, x, x_hf = ours.to(dtype), hf.to(dtype), x.to(dtype), x_hf.to(dtype)
        fwd = torch.compile(ours) if args.compile else ours

        def video_probs(logits):  # softmax averaged over each video's views
            return logits.float().softmax(-1).view(args.batch, args.views, -1).mean(1)

        fns = {"ours": lambda: video_probs(fwd(x)), "hf": lambda: video_probs(hf(pixel_values=x_hf).logits)}
        for f in fns.values():
            f()
        med, rounds = alternate(fns, args.rounds, args.steps, args.device)
    vps = {k: args.batch / v for k, v in med.items()}
    rows = [(f"videos/s ({args.views} views each)", vps["ours"], vps["hf"], vps["ours"] / vps["hf"],
             ">= 1.3"),
            ("views/s", vps["ours"] * args.views, vps["hf"] * args.views, "", ""),
            ("max |logit diff| in fp32, same weights", same, "", "", "")]
    report(args, "infer", {**run_config(args, cfg), "views": args.views}, rows,
           {"videos_per_s": vps, "ratio": vps["ours"] / vps["hf"], "seconds_per_round": rounds,
            "max_logit_diff": same})


def section_mfu(args):
    """On CUDA the peak is the published one (runtime.peak_flops); on CPU one a @ b in the benchmark's
    dtype, timed in the same rounds as the training step so both see the same machine load."""
    ours, hf, cfg = build_pair(args)
    del hf
    fns = {"train step": train_step_fn(ours, False, args)[0]}
    if args.device.type == "cpu":
        n = 256 if args.quick else 1024
        a, b = (torch.randn(n, n, dtype=dtype_of(args)) for _ in range(2))
        fns["gemm"] = lambda: a @ b
    for f in fns.values():
        f()
    med, rounds = alternate(fns, args.rounds, args.steps, args.device)
    achieved = 3 * 2 * ours.flops(args.frames, args.img_size) * args.batch / med["train step"]
    if args.device.type == "cpu":
        peak, source = 2 * n**3 / med["gemm"], f"measured {n}^3 GEMM"
    else:
        peak = runtime.peak_flops(args.device, dtype_of(args))
        source = f"published, {torch.cuda.get_device_name()}"
    rows = [("model TFLOP/s (train, 3 x 2 x MACs)", achieved / 1e12, "", "", ""),
            (f"peak TFLOP/s ({source}, {args.dtype})", peak / 1e12, "", "", ""),
            ("MFU", achieved / peak, "", "", "")]
    report(args, "mfu", {**run_config(args, cfg), "peak": source}, rows,
           {"achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "mfu": achieved / peak,
            "seconds_per_round": rounds})


def section_memory(args):
    """Ours with and without grad_checkpointing (the Hugging Face comparison is in section train)."""
    cfg = model_config(args)
    mem = measure_memory(args, [("ours", False), ("ours", True)])
    off, on = mem[("ours", False)], mem[("ours", True)]
    rows = [("activations MB (held after forward), off / on", off["activations"], on["activations"],
             off["activations"] / on["activations"], ">= 3"),
            ("step peak MB (activations + grads + temporaries), off / on", off["step_peak"], on["step_peak"],
             off["step_peak"] / on["step_peak"], ""),
            ("process peak MB (all), off / on", off["total_peak"], on["total_peak"],
             off["total_peak"] / on["total_peak"], "")]
    how = "cuda max_memory_allocated" if args.device.type == "cuda" else \
        "VmRSS/VmHWM of a fresh process per probe"
    report(args, "memory", {**run_config(args, cfg), "measured_by": how}, rows,
           {"off": off, "grad_checkpointing": on})


# ------------------------------------------------------------------------------------------------
# data: the videos


def ffmpeg_exe():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SystemExit("the data section runs FFmpeg: pip install imageio-ffmpeg") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def texture(h, w, seed):
    """A still scene: 1/f noise (the spectrum of natural images) under a few hundred flat shapes (edges)."""
    import cv2

    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** 1.1
    noise = [np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w)) for _ in range(3)]
    mix = np.array([[1, .6, .3], [.2, 1, .5], [.4, .1, 1]])  # correlated channels: natural colours
    img = np.stack([(c - c.mean()) / c.std() for c in noise], -1) @ mix
    base = np.clip(128 + 40 * img, 0, 255).astype(np.uint8)
    shapes = base.copy()
    for _ in range(300):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3, max(h, w) // 16))
        if rng.random() < 0.5:
            cv2.circle(shapes, (x, y), r, colour, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(shapes, (x, y), (x + 2 * r, y + int(rng.integers(3, 2 * r + 4))), colour, -1)
    return cv2.addWeighted(shapes, 0.6, base, 0.4, 0)


def make_clip(path, width, height, seed, quick):
    """A 10-second Kinetics-like clip as YouTube-downloaded clips are: H.264 (x264 defaults: B-frames,
    a keyframe every 250 frames and at scene cuts) with AAC audio. The scene: a textured still that the
    camera pans and zooms over, a moving test pattern, and sensor grain, which compresses as real
    footage does, not as pure noise (incompressible) or flat colour (free)."""
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    still = f"{path}.still.png"
    cv2.imwrite(still, texture(round(height * 1.4), round(width * 1.4), seed))
    phase = seed * 1.7
    scene = (f"[0:v]scale=w='{width}*(1.25+0.12*sin(t*0.5+{phase}))':h=-2:eval=frame,"
             f"crop={width}:{height}:x='(iw-ow)/2+{width // 12}*sin(t*0.4+{phase})':"
             f"y='(ih-oh)/2+{height // 12}*sin(t*0.3)'[bg];"
             f"testsrc2=s={width // 5 // 2 * 2}x{height // 4 // 2 * 2}:r={CLIP_FPS}[fg];"
             f"[bg][fg]overlay=x='mod(t*{width // 14}+{seed * 97},W-w)':"
             f"y='(H-h)/2+(H/4)*sin(t+{phase})':shortest=1,"
             "noise=alls=2:allf=t+u,format=yuv420p[v]")
    tmp = f"{path}.part.mp4"
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-loop", "1", "-framerate", str(CLIP_FPS), "-t", str(CLIP_SECONDS), "-i", still,
           "-f", "lavfi", "-t", str(CLIP_SECONDS), "-i", "sine=frequency=440",
           "-filter_complex", scene, "-map", "[v]", "-map", "1:a",
           "-c:v", "libx264", "-preset", "veryfast" if quick else "medium", "-crf", "23", "-g", "250",
           "-c:a", "aac", "-b:a", "96k", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"could not write {path}: {e.stderr.strip()[-500:]}") from None
    finally:
        for f in (still, tmp):
            if os.path.exists(f):
                os.remove(f)


def make_ssv2_clip(source, path):
    """A Something-Something-v2 clip as downloaded, from a generated clip: VP9 webm, 240 px high, 12 fps,
    4 seconds, libvpx's own keyframe placement and hidden alt-ref frames."""
    tmp = f"{path}.part.webm"
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", source, "-t", "4",
           "-an", "-vf", "scale=-2:240,fps=12", "-c:v", "libvpx-vp9", "-crf", "32", "-b:v", "0",
           "-deadline", "good", "-cpu-used", "4", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"could not write {path}: {e.stderr.strip()[-500:]}") from None


def prepared(videos, folder, options=()):
    """Each video as tools/prepare_videos.py writes it with its defaults (and `options`), in `folder`."""
    import prepare_videos

    options = prepare_videos.parse_args(["-", "-", *options])
    out = []
    for i, v in enumerate(videos):
        dst = os.path.join(folder, f"{i}_{os.path.basename(v)}")  # numbered: names may repeat across folders
        try:
            prepare_videos.prepare_one(ffmpeg_exe(), v, dst, f"{dst}.part{os.path.splitext(v)[1]}", options)
        except RuntimeError as e:
            raise SystemExit(f"could not prepare {v}: {e}") from None
        out.append(dst)
    return out


def default_gop():
    import prepare_videos

    return prepare_videos.parse_args(["-", "-"]).gop


def video_sets(args, tmp):
    """[(dataset, files, name, paths)], files 'as downloaded', 'GOP 16' or 'prepared' (the defaults):
    Kinetics-like clips as downloaded (generated, cached across runs) and the --videos given, each also
    prepared with a keyframe every 16 frames and with tools/prepare_videos.py's defaults; Something-
    Something-like webm clips as downloaded and prepared."""
    k400, ssv2 = sources(args)
    sets, gop = [], default_gop()
    for name, videos in k400.items():
        sets.append(("k400", "as downloaded", f"{name}, as downloaded", videos))
        for files, options in (("GOP 16", ["--gop", "16"]), ("prepared", [])):  # anew: the defaults change
            ready = prepared(videos, os.path.join(tmp, str(len(sets))), options)
            short, interval = min(data_info(ready[0])[2:]), 16 if options else gop
            sets.append(("k400", files, f"{name}, prepared (short side {short}, GOP {interval})", ready))
    sets.append(("ssv2", "as downloaded", "ssv2-like VP9 webm 427x240 12 fps, as downloaded", ssv2))
    ready = prepared(ssv2, os.path.join(tmp, "ssv2"))
    sets.append(("ssv2", "prepared", f"ssv2-like, prepared (GOP {gop})", ready))
    return sets


def sources(args):
    """({name: [paths]} of Kinetics-like clips: generated as downloaded, and the --videos given; [paths] of
    Something-Something-like clips made from the generated ones)."""
    missing = [v for v in args.videos or [] if not os.path.isfile(v)]
    if missing:
        raise SystemExit(f"no such video: {missing[0]}")
    width, height, count = (640, 360, 1) if args.quick else (1280, 720, 2)
    cache = os.path.join(tempfile.gettempdir(), "cover_bench_videos")
    stem = f"k400like_v{GEN_VERSION}_{width}x{height}_{'quick' if args.quick else 'full'}"
    downloaded = [os.path.join(cache, f"{stem}_{s}.mp4") for s in range(count)]
    ssv2 = [os.path.join(cache, f"{stem}_{s}_ssv2like.webm") for s in range(count)]
    for s, path in enumerate(downloaded):
        if not os.path.exists(path):
            print(f"writing {path}", flush=True)
            make_clip(path, width, height, s, args.quick)
        if not os.path.exists(ssv2[s]):
            make_ssv2_clip(path, ssv2[s])
    k400 = {f"generated {width}x{height} (GOP 250)": downloaded}
    if args.videos:
        k400["given"] = args.videos
    return k400, ssv2


def data_info(path):
    """(frames, fps, height, width)."""
    import video

    n, fps = video.video_info(path)
    h, w = video.read_video(path, [0]).shape[1:3]
    return n, fps, h, w


# ------------------------------------------------------------------------------------------------
# data: the peers' readers. Each returns uint8 (len(indices), H, W, 3) RGB and decodes on one thread.


def pyav_slowfast(path, indices):
    """The reference pipeline, as PySlowFast uses PyAV: seek to the keyframe before the clip, decode to
    its end, convert every frame of that window to RGB, keep the ones sampled."""
    import av

    wanted, out = set(indices.tolist()), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps, tb = float(stream.average_rate), float(stream.time_base)
        t0 = stream.start_time or 0
        container.seek(t0 + int(indices.min() / fps / tb), backward=True, any_frame=False, stream=stream)
        for frame in container.decode(stream):
            i = round((frame.pts - t0) * tb * fps)  # its index, if the frame rate is constant
            if i < indices.min():
                continue
            rgb = frame.to_ndarray(format="rgb24")  # PySlowFast: frame.to_rgb().to_ndarray(), every frame
            if i in wanted:
                out[i] = rgb
            if i >= indices.max():
                break
    return np.stack([out[i] for i in indices.tolist()])


def pyav_keyframe_seek(path, indices):
    """Seeks (container.seek) to the keyframe before each wanted frame when that keyframe lies past the
    decoder's position, else decodes on. Frame numbers come from a demuxed table of every packet's pts
    (no frame rate arithmetic), so it is frame-exact on any file whose packets each hold one frame."""
    import av

    out = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None]
        pts = np.array(sorted(p for p, _ in packets))
        # frame numbers of the keyframes; frame 0 counts as one, as decoding can always start there
        keys = np.union1d([0], np.flatnonzero(np.isin(pts, [p for p, key in packets if key])))
        frames, position = None, -1  # position: the number of the next frame the decoder gives
        for k in sorted(set(indices.tolist())):
            key = keys[np.searchsorted(keys, k, side="right") - 1]
            if frames is None or key > position:
                container.seek(int(pts[key]), backward=True, stream=stream)
                frames = container.decode(stream)
            for frame in frames:
                i = int(np.searchsorted(pts, frame.pts))
                position = i + 1
                if i == k:
                    out[k] = frame.to_ndarray(format="rgb24")
                    break
    return np.stack([out[i] for i in indices.tolist()])


def pyav_sequential(path, first, last):
    """Frames first..last, decoded from the start and numbered in the order they come out: the truth."""
    import av

    out = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(container.decode(stream)):
            if i >= first:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    return np.stack(out)


def ours(backend):
    """video.read_video on one reader."""
    import video

    def read(path, indices):
        video.BACKEND = backend
        return video.read_video(path, indices)
    return read


def exactness(readers, jobs):
    """{reader: (every frame the wanted one, max |pixel diff|)} against sequential PyAV decoding. Where
    pixels differ, a frame still counts as the wanted one when it is the nearest (mean |diff|, on a
    subsampled grid) among the clip's window: a reader that rounds colours differently passes when it
    picks the right frames."""
    result = {name: (True, 0) for name in readers}
    for path, idx, _ in jobs:
        first = int(idx.min())
        ref = pyav_sequential(path, first, int(idx.max()))
        for name, read in readers.items():
            got = read(path, idx)
            diff = int(np.abs(got.astype(np.int16) - ref[idx - first]).max())
            exact = diff == 0 or nearest_frames(got, ref, first) == idx.tolist()
            result[name] = (result[name][0] and exact, max(result[name][1], diff))
    return result


def nearest_frames(frames, window, first):
    small = window[:, ::4, ::4].astype(np.int16)
    return [first + int(np.argmin(np.abs(small - f[::4, ::4]).mean(axis=(1, 2, 3)))) for f in frames]


# ------------------------------------------------------------------------------------------------
# data section


def augment(frames, seed, size):
    """The spatial part of ClipDataset.train_clips, with video.py's helpers."""
    import video

    rng = np.random.default_rng(seed)
    x = video.crop_resize(frames, video.train_video_box(*frames.shape[1:3], size, rng), size)
    x = np.ascontiguousarray(x[:, :, ::-1]) if rng.random() < 0.5 else x
    return torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (C, T, S, S) uint8


R_VALUES = (1, 2, 4)  # clips per decoded video (repeated sampling, --num_sample)
OURS = [f"ours R={R}" for R in R_VALUES] + ["ours R=1, OpenCV"]  # PyAV's reader unless named
PEERS = {"pyav slowfast": pyav_slowfast, "pyav keyframe seek": pyav_keyframe_seek}  # one decode per clip


def first_window(ds, path, seed):
    """The frames ClipDataset draws for the first clip of sample seed `seed`: the clip every reader reads."""
    import video

    t_seed = np.random.default_rng(seed).integers(0, 2**63, size=(1, 2))[0, 0]
    return ds.indices(*video.video_info(path), rng=np.random.default_rng(int(t_seed)))


def train_items(ds, keys, R, backend):
    import video

    video.BACKEND = backend
    return [ds[(i, seed, R)] for i, seed in keys]


def clip_jobs(args, dataset, videos, sides):
    """Timed functions for training clips of `dataset` (its sampling, 8 frames) from `videos`, one per side:
    sides among OURS (our train item: one decode, R windows, crops and flips) and PEERS (+ the same crop);
    all read the same first clips. -> ({side: function}, {side: clips per call}, jobs)."""
    import data
    import layouts

    spec, S = data.SPECS[dataset], args.img_size
    listing = layouts.Listing.from_pairs(os.path.dirname(videos[0]), ["x"], [(v, 0) for v in videos])
    ds = data.ClipDataset(spec, listing, frames=args.frames, img_size=S, train=True)
    keys = [(i % len(videos), i) for i in range(len(videos) * args.clips)]  # (sample, sample seed)
    jobs = [(videos[i], first_window(ds, videos[i], seed), seed) for i, seed in keys]
    fns, clips = {}, {}
    for side in sides:
        if side in OURS:
            R, backend = int(side[7]), "opencv" if "OpenCV" in side else "pyav"
            fns[side], clips[side] = functools.partial(train_items, ds, keys, R, backend), R * len(keys)
        else:
            fns[side], clips[side] = functools.partial(peer_items, PEERS[side], jobs, S), len(jobs)
    return fns, clips, jobs


def clip_rates(args, sets):
    """{name: {side: clips/s per worker}} for sets {name: (dataset, videos, sides)}, every set and side
    timed in one alternation (a load that drifts during the run shifts them all alike). -> (rates,
    {name: {side: seconds per round}}, {name: jobs})."""
    import video

    fns, clips, jobs = {}, {}, {}
    for name, (dataset, videos, sides) in sets.items():
        set_fns, set_clips, jobs[name] = clip_jobs(args, dataset, videos, sides)
        fns.update({(name, k): f for k, f in set_fns.items()})
        clips.update({(name, k): c for k, c in set_clips.items()})
    default = video.BACKEND
    # the fastest round: what one core does for a worker; other work on the machine only slows a round down
    med, rounds = alternate(fns, args.rounds, 1, torch.device("cpu"), stat=min)
    video.BACKEND = default
    rates, times = {name: {} for name in sets}, {name: {} for name in sets}
    for (name, side), t in med.items():
        rates[name][side], times[name][side] = clips[(name, side)] / t, rounds[(name, side)]
    return rates, times, jobs


def peer_items(read, jobs, size):
    return [augment(read(v, idx), s, size) for v, idx, s in jobs]


def bench_videos(dataset, files, name, videos, cps, rounds, jobs):
    """Table rows and JSON results for one set of videos, from its rates."""
    readers = {"ours": ours("pyav"), "ours, OpenCV": ours("opencv"), **(PEERS if dataset == "k400" else {})}
    exact = exactness(readers, jobs)
    n, fps, h, w = data_info(videos[0])
    tag, one = f"[{name}]", cps["ours R=1"]
    rows = [(f"{tag} {dataset} clips/s per worker, R=1: ours / ours with OpenCV's reader", one,
             cps["ours R=1, OpenCV"], ratio(one, cps["ours R=1, OpenCV"]), "")]
    rows += [(f"{tag} clips/s: ours R=1 / {peer}", one, cps[peer], ratio(one, cps[peer]), "")
             for peer in PEERS if peer in cps]
    rows += [(f"{tag} clips/s: ours at R={R} / ours at R=1", cps[f"ours R={R}"], one,
              ratio(cps[f"ours R={R}"], one), "") for R in R_VALUES[1:]]
    rows += [(f"{tag} same frames as sequential PyAV: " + " / ".join(readers),
              " / ".join(str(exact[k][0]) for k in readers), "", "", "True / ..."),
             (f"{tag} max |pixel diff| vs PyAV rgb24: " + " / ".join(readers),
              " / ".join(str(exact[k][1]) for k in readers), "", "", "0 / ...")]
    results = {"dataset": dataset, "files": files, "videos": [os.path.basename(v) for v in videos],
               "size": f"{w}x{h}", "frames": n, "fps": fps,
               "mbit_per_s": statistics.mean(megabits_per_s(v) for v in videos),
               "clips_per_s": cps, "frame_exact": {k: e[0] for k, e in exact.items()},
               "max_pixel_diff": {k: e[1] for k, e in exact.items()}, "seconds_per_round": rounds}
    return rows, results


def goal_rows(results):
    """Per source of Kinetics-like clips: ours on files prepared with the defaults against PyAV keyframe seek
    on GOP-16 files, and against our OpenCV reader on GOP-16 files (this project's loader before PyAV)."""
    rows, gop16 = [], None
    for name, r in results.items():  # each source: as downloaded, GOP 16, then (unless 16) the defaults
        gop16 = r if r["files"] == "GOP 16" else gop16
        if r["dataset"] != "k400" or r["files"] != "prepared":
            continue
        ours_now = r["clips_per_s"]["ours R=1"]
        for side, target in (("pyav keyframe seek", ">= 1.5"), ("ours R=1, OpenCV", ">= 2")):
            then = gop16["clips_per_s"][side]
            rows.append((f"[{name}] ours R=1 / {side} on the GOP-16 files", ours_now, then,
                         ratio(ours_now, then), target))
    return rows


def per_worker_table(results, sides):
    """A markdown table: one row a set of videos, its size and bit rate, clips/s per worker of each side."""
    lines = ["| videos | size | Mbit/s | " + " | ".join(sides) + " |", "|---|---|---|" + "---|" * len(sides)]
    for name, r in results.items():
        cells = [fmt(r["clips_per_s"][k]) if k in r["clips_per_s"] else "" for k in sides]
        lines.append(f"| {name} | {r['size']} | {r['mbit_per_s']:.2f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def megabits_per_s(path):
    import video

    n, fps = video.video_info(path)
    return os.path.getsize(path) * 8e-6 / (n / fps)


def bench_images(args, videos, folder):
    """Images/s of the ImageNet train path vs decoding the same JPEGs with bare Pillow."""
    import data
    import layouts
    from PIL import Image

    images = make_jpegs(videos, args.images, folder)
    listing = layouts.Listing.from_pairs(folder, ["x"], [(p, 0) for p in images])
    ids = data.ClipDataset(data.SPECS["in1k"], listing, img_size=args.img_size, train=True)
    fns = {"ours": lambda: [ids[(i, i)] for i in range(len(images))],
           "pillow": lambda: [np.asarray(Image.open(p).convert("RGB")) for p in images]}
    med, rounds = alternate(fns, args.rounds, 1, torch.device("cpu"), stat=min)
    ips = {k: len(images) / v for k, v in med.items()}
    row = ("images/s: ImageNet train item / Pillow decode", ips["ours"], ips["pillow"],
           ips["ours"] / ips["pillow"], ">= 0.8")
    return row, {"images": len(images), "images_per_s": ips, "seconds_per_round": rounds}


def make_jpegs(videos, n, folder, size=(500, 375)):
    """n ImageNet-sized JPEGs (quality 90) from the videos' frames."""
    import cv2
    import video
    from PIL import Image

    per_video = n // len(videos) + 1
    frames = [f for v in videos
              for f in video.read_video(v, np.arange(0, 24 * per_video, 24) % video.video_info(v)[0])]
    paths = []
    for k, f in enumerate(frames[:n]):
        paths.append(os.path.join(folder, f"{k}.jpg"))
        Image.fromarray(cv2.resize(f, size, interpolation=cv2.INTER_AREA)).save(paths[-1], quality=90)
    return paths


def workers_table(results, images_per_s):
    """Loader workers (one core each) an H100 needs to train ViT-B 8x224 at 40% MFU, R = 1: K400 alone, and
    the cover recipe's round robin (K400, SSv2, IN-21K-P; batch 64 / 64 / 256 a step), per reader, K400
    prepared and as downloaded, SSv2 as it reads faster. Worker-seconds of loading per period of the mix
    over the GPU-seconds of that period."""
    import data
    import recipes

    with torch.device("meta"):
        base = M.TimeSformer(M.make_config("base"))
    speed = runtime.ASSUMED_MFU * runtime.GPU_BF16_PEAKS["H100"]  # FLOP/s; a training step is 3 passes
    clip_s, image_s = 6 * base.flops(8, 224) / speed, 6 * base.flops(1, 224) / speed  # GPU-seconds each
    batch = recipes.RECIPES["cover"]["batch_size"]
    images = batch * data.SPECS["in21k"].batch_scale
    ssv2 = [r["clips_per_s"] for r in results.values() if r["dataset"] == "ssv2"]
    lines = ["| Kinetics clips | reader | K400 alone | cover mix |", "|---|---|---|---|"]
    for name, r in results.items():
        if r["dataset"] != "k400" or r["files"] == "GOP 16":
            continue
        for side, reader in (("ours R=1", "PyAV"), ("ours R=1, OpenCV", "OpenCV only")):
            k400, ss = r["clips_per_s"][side], max(s[side] for s in ssv2)  # SSv2 as it reads faster
            alone = 1 / (clip_s * k400)
            loading = batch / k400 + batch / ss + images / images_per_s  # worker-seconds a period
            mix = loading / (2 * batch * clip_s + images * image_s)
            lines.append(f"| {name} | {reader} | {alone:.0f} | {mix:.0f} |")
    return "\n".join(lines)


def single_threaded():
    """What one DataLoader worker gets: one thread (and PyAV, the peer decoder)."""
    import cv2

    try:
        import av  # noqa: F401
    except ImportError:
        raise SystemExit("the data sections compare with PyAV: pip install av") from None
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def section_data(args):
    single_threaded()
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = video_sets(args, tmp)
        cps, rounds, jobs = clip_rates(args, {name: (dataset, videos, OURS + (list(PEERS) if dataset == "k400"
                                                                              else []))
                                               for dataset, _, name, videos in sets})
        for dataset, files, name, videos in sets:
            set_rows, results[name] = bench_videos(dataset, files, name, videos, cps[name], rounds[name],
                                                   jobs[name])
            rows += set_rows
        image_row, results["images"] = bench_images(args, sets[0][3], tmp)
    torch.set_num_threads(args.threads or os.cpu_count())
    config = {"clips_per_video": args.clips, "frames": args.frames, "img_size": args.img_size, "rate": 32,
              "rounds": args.rounds, "threads": 1}
    videos = {k: v for k, v in results.items() if k != "images"}
    report(args, "data", config, rows + goal_rows(videos) + [image_row], results)
    print(f"\nclips/s per worker (one core), {args.frames}-frame training clips, {args.img_size} px:\n"
          + per_worker_table(videos, OURS + list(PEERS)))
    print(f"\nworkers per H100 at {runtime.ASSUMED_MFU:.0%} MFU, R = 1 (images: "
          f"{results['images']['images_per_s']['ours']:.0f}/s per worker):\n"
          + workers_table(videos, results["images"]["images_per_s"]["ours"]))


PREPARE_VARIANTS = [("--gop", "4"), ("--gop", "8"), ("--gop", "16"), ("--short_side", "256"), ("--crf", "28")]


def section_prepare(args):
    """What tools/prepare_videos.py should default to: per option variant, the clips/s per worker of our
    train item (PyAV's seeking reader, and OpenCV's that never seeks) and of PyAV keyframe seek, with the
    bit rate."""
    single_threaded()
    results, sides, sets = {}, ["ours R=1", "ours R=1, OpenCV", "pyav keyframe seek"], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, videos in sources(args)[0].items():
            for options in PREPARE_VARIANTS:
                label = f"{name.split(' (')[0]}, prepared {' '.join(options)}"
                sets[label] = ("k400", prepared(videos, os.path.join(tmp, str(len(sets))), options), sides)
        cps, rounds, _ = clip_rates(args, sets)
        for label, (_, ready, _) in sets.items():
            h, w = data_info(ready[0])[2:]
            results[label] = {"options": label.split("prepared ")[1].split(), "size": f"{w}x{h}",
                              "clips_per_s": cps[label], "seconds_per_round": rounds[label],
                              "mbit_per_s": statistics.mean(megabits_per_s(v) for v in ready)}
    torch.set_num_threads(args.threads or os.cpu_count())
    config = {"clips_per_video": args.clips, "frames": args.frames, "img_size": args.img_size,
              "rounds": args.rounds, "threads": 1, "default_gop": default_gop()}
    report(args, "prepare", config, [], results)
    print(f"\ntools/prepare_videos.py options (each on its defaults), clips/s per worker (one core), "
          f"Kinetics {args.frames}x32:\n" + per_worker_table(results, sides))


def long_videos(args):
    """{name: path}: a 10-minute 640x360 H.264 video at 30 fps with x264's defaults (a keyframe every 250
    frames), as downloaded and as tools/prepare_videos.py writes it; kept in <tmp>/cover_bench_videos."""
    seconds, size = (20, "320x180") if args.quick else (600, "640x360")
    cache = os.path.join(tempfile.gettempdir(), "cover_bench_videos")
    path = os.path.join(cache, f"long_v{GEN_VERSION}_{size}_{seconds}s.mp4")
    if not os.path.exists(path):
        print(f"writing {path}", flush=True)
        os.makedirs(cache, exist_ok=True)
        subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=s={size}:r=30:d={seconds},noise=alls=4:allf=t+u", "-c:v", "libx264",
                        "-preset", "veryfast", "-pix_fmt", "yuv420p", f"{path}.part.mp4"], check=True)
        os.replace(f"{path}.part.mp4", path)
    ready = os.path.join(cache, f"{os.path.basename(path)}.prepared")
    if not os.path.exists(ready):
        os.makedirs(ready)
        prepared([path], ready)
    return {"as downloaded": path, "prepared": os.path.join(ready, os.listdir(ready)[0])}


def with_reader(item, open_video, known):
    """The train item run with data.py reading through `open_video`, and video.KNOWN = `known`."""
    def run():
        import data
        import video

        data.open_video, video.KNOWN = open_video, known
        return item()
    return run


def section_long(args):
    import importlib.util

    import data
    import video

    single_threaded()
    sides, clips, results = {}, {}, {}
    before = None
    if args.before:  # another commit's reader, as a module of its own
        spec = importlib.util.spec_from_file_location("video_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
    for name, path in long_videos(args).items():
        fns, counts, _ = clip_jobs(args, "k400", [path], ["ours R=1"])
        clips[name] = counts["ours R=1"]
        sides[(name, "lists kept")] = with_reader(fns["ours R=1"], video.open_video, video.Known(64 * 2**20))
        sides[(name, "listed at every read")] = with_reader(fns["ours R=1"], video.open_video, video.Known(0))
        if before:
            sides[(name, args.before)] = with_reader(fns["ours R=1"], before.open_video, video.Known(0))
        video.KNOWN = video.Known(64 * 2**20)  # the bytes one file's list keeps: its arrays'
        n = video.video_info(path)[0]
        kept = video.KNOWN.bytes
        results[name] = {"frames": n, "bytes_kept": kept, "bytes_per_frame": kept / n, "clips_per_s": {}}
    best, _ = alternate(sides, args.rounds, 1, torch.device("cpu"), stat=min)  # each side's fastest round
    data.open_video, video.KNOWN = video.open_video, video.Known(64 * 2**20)
    rows = []
    for (name, side), t in best.items():
        results[name]["clips_per_s"][side] = clips[name] / t
    for name, r in results.items():
        cps = r["clips_per_s"]
        rows += [(f"[{name}] clips/s: {side} / listed at every read", cps[side], cps["listed at every read"],
                  ratio(cps[side], cps["listed at every read"]), "") for side in cps if side != "listed at every read"]
        rows.append((f"[{name}] bytes a packet list keeps per frame ({r['frames']} frames)", r["bytes_per_frame"],
                     "", "", ""))
    config = {"clips_per_video": args.clips, "frames": args.frames, "img_size": args.img_size, "rate": 32,
              "rounds": args.rounds, "threads": 1}
    report(args, "long", config, rows, results)


SECTIONS = {"train": section_train, "infer": section_infer, "mfu": section_mfu, "data": section_data,
            "prepare": section_prepare, "memory": section_memory, "long": section_long}


def main():
    args = parse_args()
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py runs fp32 (runtime.setup)
    torch.set_num_threads(args.threads or os.cpu_count())
    if args._memory_probe:  # a child of measure_memory: one probe, one JSON line
        impl, ckpt = args._memory_probe.split(",")
        print(json.dumps(memory_probe(args, impl, bool(int(ckpt)))))
        return
    for name in SECTIONS if "all" in args.section else args.section:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
