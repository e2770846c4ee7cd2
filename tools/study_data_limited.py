"""
The co-training study in the paper's regime, at toy scale: where a video set alone is too small for the
trunk, do other video sets (other label spaces) and images help it? A table and a plot of the gain of each
mix over the set alone, against the training clips per class. (tools/study.py is the step-limited study.)

    python tools/study_data_limited.py       # docs/study.md's table: N = 4, 8, 16, seeds 0-2; resumes
    python tools/study_data_limited.py --n 8 --seeds 0 --steps_per_set 200

The design, fixed before any of it was run:
  * data (demo.py): demo_few_kinetics (a circle, triangle or cross, still or moving: appearance and some
    motion) and demo_few_ssv2 (six directions in which any shape moves: motion only), N training clips a
    class; demo_few_images (stills of three other shapes, 128 a class: images are plentiful). 216
    validation clips each, the same for every N;
  * every run is train.py with the demo recipe (model, batch 32, AdamW, warm-up then cosine over the
    run's steps), validated clip-level every --steps_per_set / 6 steps, multi-view tested at the end;
  * per N and seed: each video set alone for --steps_per_set optimizer steps; kinetics + ssv2, and
    kinetics + ssv2 + images, round robin with --steps_per_set steps for each set, so each set sees its own
    clips as often as alone and the others add data, not steps of its own; and the paper's baseline:
    images alone for --steps_per_set steps (once per seed), then the video set alone for --steps_per_set
    steps from those weights (a new head);
  * the number a run reports for a set is its best validation top-1 during the run (trained until it stops
    improving); beside it the training top-1 at the end (clip-level, on its training clips) and the final
    multi-view test; a set's gain from a mix is its number in the mix minus alone, per seed, then mean ± std.
Writes <out_dir>/study.json (every run's numbers, per seed), prints the table, and plots the gains to
<out_dir>/gain.png (matplotlib, a tools-only package: pip install matplotlib).
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules live in the parent folder

import demo  # noqa: E402
import eval as eval_py  # noqa: E402
import train as train_py  # noqa: E402
from study import cell  # noqa: E402  (mean ± std over seeds, as the step-limited study prints it)

KIN, SSV2, IMG = "demo_few_kinetics", "demo_few_ssv2", "demo_few_images"
VIDEO = (KIN, SSV2)
MIXES = {"alone": None, "kinetics + ssv2": [KIN, SSV2], "kinetics + ssv2 + images": [KIN, SSV2, IMG],
         "images, then alone": None}  # the rows, for each video set


def train(out, datasets, steps, seed, data_dir, args, extra=()):
    """train.py, then eval.py clip-level on the training and on the validation clips, run here (their
    output to <out>/stdout.txt) -> {dataset: numbers}. A finished run (study_run.json) is read back."""
    done = os.path.join(out, "study_run.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["result"]
    os.makedirs(out, exist_ok=True)
    every = max(1, steps // 6)
    ckpt = os.path.join(out, "ckpt.pt")
    runs = [(train_py, ["--recipe", "demo", "--datasets", ",".join(datasets), "--data_dir", data_dir,
                        "--out_dir", out, "--max_steps", str(steps), "--seed", str(seed), "--eval_every",
                        str(every), "--save_every", str(steps), "--workers", str(args.workers),
                        *(["--batch_size", str(args.batch_size)] if args.batch_size else []), *extra])]
    runs += [(eval_py, ["--ckpt", ckpt, "--split", split, "--views", "1x1", "--workers", str(args.workers),
                        "--out", os.path.join(out, f"{split}.json")]) for split in ("train", "val")]
    t0 = time.time()
    for script, argv in runs:
        with open(os.path.join(out, "stdout.txt"), "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(io.StringIO()):  # the progress bar is dropped
            script.main(argv)
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    end = {split: json.load(open(os.path.join(out, f"{split}.json"))) for split in ("train", "val")}
    val = [(r["step"], r["val"]) for r in records if "val" in r] + [(steps, end["val"])]  # clip-level, 1 view
    result = {}
    for n in datasets:
        best_step, best = max(((s, v[n]["top1"]) for s, v in val), key=lambda sv: (sv[1], -sv[0]))
        result[n] = {"best_val": 100 * best, "best_step": best_step, "train": 100 * end["train"][n]["top1"],
                     "val": 100 * end["val"][n]["top1"], "test": 100 * records[-1]["test"][n]["top1"],
                     "steps": steps}
    with open(done, "w") as f:
        json.dump({"train.py": runs[0][1], "result": result, "seconds": time.time() - t0}, f)
    return result


def runs_of(n, seed, args):
    """{(row, video set): its numbers} of one N and seed; the runs in the order the design gives them."""
    data_dir = os.path.join(args.out_dir, "data", f"n{n}")
    demo.prepare(data_dir, [KIN, SSV2], train_per_class=n, val_per_class=args.val_per_class)
    demo.prepare(os.path.join(args.out_dir, "data", "images"), [IMG], val_per_class=args.val_per_class)
    if not os.path.exists(os.path.join(data_dir, IMG)):  # one image set for every N
        images = os.path.abspath(os.path.join(args.out_dir, "data", "images", IMG))
        os.symlink(images, os.path.join(data_dir, IMG))
    S, folder = args.steps_per_set, os.path.join(args.out_dir, f"n{n}", f"seed{seed}")
    out = {}
    for v in VIDEO:
        out[("alone", v)] = train(os.path.join(folder, f"{v}_alone"), [v], S, seed, data_dir, args)[v]
    for row, mix in MIXES.items():
        if mix:
            result = train(os.path.join(folder, "+".join(mix)), mix, S * len(mix), seed, data_dir, args)
            out.update({(row, v): result[v] for v in VIDEO})
    images = os.path.join(args.out_dir, "images", f"seed{seed}")  # the pre-training, shared by every N
    train(images, [IMG], S, seed, data_dir, args)
    for v in VIDEO:
        init = ["--init", os.path.join(images, "ckpt.pt")]
        out[("images, then alone", v)] = train(os.path.join(folder, f"images_then_{v}"), [v], S, seed,
                                              data_dir, args, init)[v]
    return out


def gain(results, n, seeds, row, v):
    """Per seed, video set v's best validation top-1 in a row minus alone (points)."""
    return [results[(n, s)][(row, v)]["best_val"] - results[(n, s)][("alone", v)]["best_val"] for s in seeds]


def table(results, ns, seeds):
    """Markdown: per N and row, each video set's best validation top-1 (and training top-1, final test)."""
    lines = ["| N a class | training | " + " | ".join(f"{short(v)}: best val / train / test" for v in VIDEO)
             + " | " + " | ".join(f"{short(v)} gain" for v in VIDEO) + " |", "|---|---|" + "---|" * 4]
    for n in ns:
        for row in MIXES:
            cells, gains = [], []
            for v in VIDEO:
                runs = [results[(n, s)][(row, v)] for s in seeds]
                cells.append(" / ".join(cell([r[k] for r in runs]) for k in ("best_val", "train", "test")))
                gains.append("-" if row == "alone" else cell(gain(results, n, seeds, row, v)))
            lines.append(f"| {n} | {row} | " + " | ".join(cells) + " | " + " | ".join(gains) + " |")
    return lines


def plot(results, ns, seeds, path):
    """Gain over the set alone (best validation top-1, points) against N, one panel per video set."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: pip install matplotlib")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, v in zip(axes, VIDEO):
        for k, row in enumerate(r for r in MIXES if r != "alone"):
            gains = [gain(results, n, seeds, row, v) for n in ns]
            x = [n * (1.06 ** (k - 1)) for n in ns]  # side by side on the log axis
            mean = [statistics.mean(g) for g in gains]
            spread = [statistics.stdev(g) if len(g) > 1 else 0 for g in gains]
            ax.errorbar(x, mean, yerr=spread, marker="o", capsize=3, label=row)
            ax.scatter([xi for xi, g in zip(x, gains) for _ in g], [gi for g in gains for gi in g], s=8,
                       alpha=0.4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xticks=ns, xticklabels=[str(n) for n in ns], title=short(v),
               xlabel="training clips per class")
        ax.minorticks_off()
    axes[0].set_ylabel("gain over the set alone (best val top-1, points)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def short(name):
    return name.removeprefix("demo_few_")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="4,8,16", help="training clips per class of the video sets")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps_per_set", type=int, default=400, help="optimizer steps each set gets in a run")
    p.add_argument("--out_dir", default="study_data_limited")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of each run")
    p.add_argument("--val_per_class", type=int, default=None, help="fewer validation clips (tests only)")
    p.add_argument("--batch_size", type=int, default=None, help="another batch than the recipe's (tests only)")
    args = p.parse_args(argv)
    ns, seeds = [int(n) for n in args.n.split(",")], [int(s) for s in args.seeds.split(",")]
    results, t0 = {}, time.time()
    for seed in seeds:  # seed by seed: a first seed of every N comes early
        for n in ns:
            results[(n, seed)] = runs_of(n, seed, args)
            print(f"N {n}, seed {seed}: " + ", ".join(f"{row} {short(v)} {r['best_val']:.1f}"
                                                      for (row, v), r in results[(n, seed)].items())
                  + f" ({(time.time() - t0) / 60:.0f} min so far)", flush=True)
    lines = table(results, ns, seeds)
    print("\n".join(lines))
    with open(os.path.join(args.out_dir, "study.json"), "w") as f:
        runs = [{"n": n, "seed": s, "training": row, "dataset": v, **r}
                for (n, s), rows in results.items() for (row, v), r in rows.items()]
        json.dump({"n": ns, "seeds": seeds, "steps_per_set": args.steps_per_set, "table": lines,
                   "runs": runs}, f, indent=1)
    plot(results, ns, seeds, os.path.join(args.out_dir, "gain.png"))


if __name__ == "__main__":
    main()
