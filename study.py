"""The demo co-training study: does co-training on video sets with different label spaces help each of
them, and do images (single-frame videos) help further? At toy scale, on a CPU, 3 seeds a row.

    python study.py                 # all rows, 3 seeds: ~1 h on 2 CPU cores; resumes where it stopped
    python study.py --seeds 0 --steps 300 --out_dir study_quick

Every row trains the same model for the same number of optimizer steps (--steps) with train.py's demo
defaults and is tested with train.py's multi-view test on the datasets it trained on. The last rows are the
paper's baseline at this scale: pre-train the trunk on demo_imagenet alone, then fine-tune on each video
set (pre-training + fine-tuning = --steps). Prints a markdown table and writes <out_dir>/study.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VIDEO = ["demo_kinetics", "demo_ssv2"]
MIXES = [["demo_ssv2"], ["demo_kinetics"], ["demo_kinetics", "demo_ssv2"],
         ["demo_kinetics", "demo_ssv2", "demo_imagenet"]]


def run(out, datasets, steps, seed, extra=()):
    """train.py in its own process; returns (eval.json, seconds). A finished run (eval.json) is reused."""
    done = os.path.join(out, "study_run.json")
    if os.path.exists(done):
        with open(done) as f:
            r = json.load(f)
        return r["test"], r["seconds"]
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "train.py", "--datasets", ",".join(datasets), "--max_steps", str(steps),
           "--seed", str(seed), "--out_dir", out, "--eval_every", "0", *extra]
    t0 = time.time()
    with open(os.path.join(out, "stdout.txt"), "w") as log:  # the progress bar (stderr) is dropped
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.DEVNULL)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {out}/stdout.txt")
    seconds = time.time() - t0
    with open(os.path.join(out, "eval.json")) as f:
        test = json.load(f)
    with open(done, "w") as f:
        json.dump({"cmd": cmd, "test": test, "seconds": seconds}, f)
    return test, seconds


def cell(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per row (pre-training included)")
    p.add_argument("--pretrain_steps", type=int, default=200, help="baseline: steps on demo_imagenet first")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out_dir", default="study")
    p.add_argument("--data_dir", default="data")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--data_dir", args.data_dir]
    rows = []  # (label, steps per dataset, {dataset: [top-1 per seed]}, [seconds per seed])
    for mix in MIXES:
        accs, secs = {n: [] for n in mix}, []
        for seed in seeds:
            test, s = run(os.path.join(args.out_dir, "+".join(mix), f"seed{seed}"), mix, args.steps, seed, common)
            for n in mix:
                accs[n].append(100 * test[n]["top1"])
            secs.append(s)
            print(f"{'+'.join(mix)} seed {seed}: " + " ".join(f"{n} {accs[n][-1]:.1f}" for n in mix)
                  + f" ({s / 60:.1f} min)", flush=True)
        rows.append((" + ".join(n.removeprefix("demo_") for n in mix), f"{args.steps // len(mix)} each", accs, secs))
    # baseline: image pre-training, then fine-tuning on one video set (a fresh head, the trunk from the image run)
    ft = args.steps - args.pretrain_steps
    for video in VIDEO:
        accs, secs = {video: []}, []
        for seed in seeds:
            pre = os.path.join(args.out_dir, "pretrain_imagenet", f"seed{seed}")
            _, s_pre = run(pre, ["demo_imagenet"], args.pretrain_steps, seed, common)  # shared by both video sets
            test, s = run(os.path.join(args.out_dir, f"imagenet_then_{video}", f"seed{seed}"), [video], ft, seed,
                          common + ["--init", os.path.join(pre, "ckpt.pt")])
            accs[video].append(100 * test[video]["top1"])
            secs.append(s + s_pre)
            print(f"imagenet -> {video} seed {seed}: {accs[video][-1]:.1f}", flush=True)
        rows.append((f"imagenet, then {video.removeprefix('demo_')}", f"{args.pretrain_steps} + {ft}", accs, secs))

    import torch  # only for the versions in the header
    names = ["demo_kinetics", "demo_ssv2", "demo_imagenet"]
    lines = [f"{len(seeds)} seeds ({args.seeds}), {args.steps} steps a row, multi-view top-1 (%), mean ± std over seeds; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             "", "| training mix | steps per dataset | " + " | ".join(names) + " | minutes a run |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for label, steps, accs, secs in rows:
        lines.append(f"| {label} | {steps} | " + " | ".join(cell(accs.get(n, [])) for n in names)
                     + f" | {statistics.mean(secs) / 60:.1f} |")
    print("\n".join(lines))
    with open(os.path.join(args.out_dir, "study.json"), "w") as f:
        json.dump({"steps": args.steps, "pretrain_steps": args.pretrain_steps, "seeds": seeds,
                   "rows": [{"mix": r[0], "steps": r[1], "top1": r[2], "seconds": r[3]} for r in rows],
                   "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
