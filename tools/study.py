"""The co-training study on the demo data: does co-training on video sets with different label spaces
help each of them, and do images (single-frame videos) help further? At toy scale, on a CPU.

    python tools/study.py             # every row, 3 seeds: ~1.5 h on 2 CPU cores; resumes where it stopped
    python tools/study.py --seeds 0 --steps 300 --out_dir study_quick

The design, fixed before any of it was run:
  * every run is train.py with the demo recipe (recipes.py: model, batch, schedule; demo_ssv2 gets twice
    the steps of the others in a mix), tested with train.py's multi-view test on the datasets it trained on;
  * the main rows have the same budget, --steps optimizer steps (the recipe's, so the three-way row is
    exactly `python train.py --seed S`): each video set alone, kinetics + ssv2, and kinetics + ssv2 +
    imagenet. In a mix each dataset gets its share of the steps (printed per row);
  * the 'its steps in the three-way mix' rows train a video set alone for exactly the steps it gets in
    the three-way mix, so the mix is also compared with what its own steps give without the other data;
  * the paper's baseline at this scale: pre-train the trunk on demo_imagenet alone for imagenet's share of
    the three-way mix, then fine-tune on one video set for the rest of --steps (a new head).
Prints a markdown table and writes <out_dir>/study.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

# the project's modules are in the folder above, which is not on the path when this runs as a script
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import recipes  # noqa: E402
import train  # noqa: E402
from recipes import RECIPES  # noqa: E402

KIN, SSV2, IMG = "demo_kinetics", "demo_ssv2", "demo_imagenet"
VIDEO, ALL = [KIN, SSV2], [KIN, SSV2, IMG]


def steps_per_dataset(mix, steps):
    """{dataset: optimizer steps it gets} in `steps` steps of the demo recipe's schedule of `mix`."""
    weights = recipes.dataset_weights(train.get_args(["--recipe", "demo", "--datasets", ",".join(mix)]), mix)
    return {n: data.steps_before(steps, d, weights) for d, n in enumerate(mix)}


def run(out, datasets, steps, seed, extra=()):
    """train.py in its own process -> (eval.json, seconds). A finished run (study_run.json) is reused."""
    done = os.path.join(out, "study_run.json")
    if os.path.exists(done):
        with open(done) as f:
            r = json.load(f)
        return r["test"], r["seconds"]
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--recipe", "demo", "--datasets",
           ",".join(datasets), "--max_steps", str(steps), "--seed", str(seed), "--out_dir", out, *extra]
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


def short(name):
    return name.removeprefix("demo_")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=RECIPES["demo"]["max_steps"], help="optimizer steps per row")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out_dir", default="study")
    p.add_argument("--data_dir", default="data")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--data_dir", args.data_dir]
    share = steps_per_dataset(ALL, args.steps)  # what each dataset gets in the three-way mix
    # (row label, [(run folder, datasets, steps, extra flags), ...] per seed, {dataset: steps it trained})
    rows = []
    for mix in [[SSV2], [KIN], VIDEO, ALL]:
        def runs(seed, mix=mix):
            return [("+".join(mix), mix, args.steps, [])]
        rows.append((" + ".join(map(short, mix)), runs, steps_per_dataset(mix, args.steps)))
    for video in (SSV2, KIN):
        def runs(seed, v=video):
            return [(f"{v}_{share[v]}", [v], share[v], [])]
        rows.append((f"{short(video)} alone, its steps in the three-way mix", runs, {video: share[video]}))
    rest = args.steps - share[IMG]  # the fine-tuning steps after image pre-training
    for video in (SSV2, KIN):
        def runs(seed, v=video):
            pre = os.path.join(args.out_dir, "pretrain_imagenet", f"seed{seed}", "ckpt.pt")
            return [("pretrain_imagenet", [IMG], share[IMG], []),
                    (f"imagenet_then_{v}", [v], rest, ["--init", pre])]
        rows.append((f"imagenet, then {short(video)}", runs, {IMG: share[IMG], video: rest}))

    results = []  # (label, steps, {dataset: [top-1 per seed]}, [seconds per seed])
    for label, runs, steps in rows:
        accs, secs = {}, []
        for seed in seeds:
            total = 0.0
            for folder, datasets, n, extra in runs(seed):
                out = os.path.join(args.out_dir, folder, f"seed{seed}")
                test, s = run(out, datasets, n, seed, common + extra)
                total += s
            for n in datasets:  # the datasets of the row's last run are the ones it is tested on
                accs.setdefault(n, []).append(100 * test[n]["top1"])
            secs.append(total)
            print(f"{label}, seed {seed}: " + " ".join(f"{n} {a[-1]:.1f}" for n, a in accs.items())
                  + f" ({total / 60:.1f} min)", flush=True)
        results.append((label, steps, accs, secs))

    lines = [f"{len(seeds)} seeds ({args.seeds}), {args.steps} optimizer steps a row, multi-view top-1 (%), "
             f"mean ± std over seeds; {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}",
             "",
             "| training | steps per dataset | " + " | ".join(map(short, ALL)) + " | minutes a run |",
             "|---|---|" + "---|" * len(ALL) + "---|"]
    for label, steps, accs, secs in results:
        per_dataset = ", ".join(f"{short(n)} {k}" for n, k in steps.items())
        cells = " | ".join(cell(accs.get(n, [])) for n in ALL)
        lines.append(f"| {label} | {per_dataset} | {cells} | {statistics.mean(secs) / 60:.1f} |")
    print("\n".join(lines))
    with open(os.path.join(args.out_dir, "study.json"), "w") as f:
        summary = [{"training": r[0], "steps": r[1], "top1": r[2], "seconds": r[3]} for r in results]
        json.dump({"steps": args.steps, "seeds": seeds, "table": lines, "rows": summary}, f, indent=1)


if __name__ == "__main__":
    main()
