"""
Multi-view testing of a trained checkpoint (its moving average of the weights when train.py kept one):
temporal clips x spatial crops per video, softmax averaged. A clip that cannot be decoded is counted as
failed, never replaced: top-1/top-5 are over the clips that decoded, "clips" is the whole validation set.

    python eval.py --ckpt out/ckpt.pt                        # the checkpoint's datasets and data folder
    python eval.py --ckpt out/ckpt.pt --datasets k400 --views 1x3
    torchrun --nproc_per_node=8 eval.py --ckpt out/ckpt.pt   # every clip counted once over all ranks
    python eval.py --ckpt out/ckpt.pt --video clip.mp4 --head k400   # top-5 class names for one file

Features for linear probes or retrieval: features.py, with the same flags.
"""

import argparse
import contextlib
import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

import checkpoints
import data
import kinetics
import loaders
import demo  # noqa: F401  (registers the demo sets)
import model as M
import recipes
import runtime


@torch.inference_mode()
def evaluate(model, dataset, *, head, normalize, device, dtype=torch.float32, rank=0, world=1, batch_size=8,
             workers=2, rows=None, samples=0):
    """Top-1 / top-5 / per-class top-1 of `head` on `dataset` (train=False) over all ranks, in eval mode; of
    `samples` of it (fixed_subset) where given. rows: the head's rows of the dataset's classes, in their order,
    where the head has more (a k710 head)."""
    model.eval()
    loader = loaders.build_eval_loader(dataset, batch_size=max(1, batch_size), rank=rank, world=world,
                                    workers=workers, pin_memory=device.type == "cuda",
                                    indices=fixed_subset(len(dataset), samples))
    K = len(dataset.classes)
    rows = None if rows is None else torch.as_tensor(rows, device=device)
    # per class: top-1, top-5, decoded, failed; int32: exact, and every device adds them (MPS has no float64)
    counts = torch.zeros(4, K, dtype=torch.int32, device=device)
    for batch in loader:
        B, V = batch["x"].shape[:2]  # (B, V, C, T, H, W) uint8
        x = normalize(batch["x"].to(device, non_blocking=True)).flatten(0, 1)  # (B*V, C, T, H, W)
        with runtime.autocast(device, dtype):
            logits = model(x, head=head)
        logits = logits if rows is None else logits[:, rows]  # (B*V, K)
        prob = logits.float().softmax(dim=-1).view(B, V, K).mean(dim=1)  # average the views' softmax
        y, ok = batch["y"].to(device), batch["ok"].to(device)
        top = prob.topk(min(5, K), dim=-1).indices  # (B, 5)
        counts[0].index_add_(0, y, ((top[:, 0] == y) & ok).int())
        counts[1].index_add_(0, y, ((top == y[:, None]).any(dim=-1) & ok).int())
        counts[2].index_add_(0, y, ok.int())
        counts[3].index_add_(0, y, (~ok).int())
    if world > 1:
        dist.all_reduce(counts)
    top1, top5, decoded, failed = counts.tolist()  # per class
    acc = {k: top1[k] / decoded[k] for k in range(K) if decoded[k]}  # the classes with a decoded clip
    repeated = {c for c, n in Counter(dataset.classes).items() if n > 1}  # e.g. ImageNet's two "crane"s
    names = [f"{c} ({k})" if c in repeated else c for k, c in enumerate(dataset.classes)]
    return {"top1": sum(top1) / max(sum(decoded), 1), "top5": sum(top5) / max(sum(decoded), 1),
            "clips": sum(decoded) + sum(failed), "failed": sum(failed), "views": dataset.num_views,
            "mean_class_top1": sum(acc.values()) / len(acc) if acc else 0.0,
            "per_class_top1": {names[k]: round(a, 4) for k, a in acc.items()}}


def fixed_subset(n, k):
    """k of the indices 0..n-1, evenly spaced (a listing sorted by class gives each class its share), the same
    on every call: periodic validation compares like with like. All of them for k = 0 or k >= n."""
    return range(n) if k <= 0 or k >= n else [i * n // k for i in range(k)]


def test_all(model, datasets, *, batch_sizes, out=None, rank=0, heads=None, label_maps=None, guard=None, **kw):
    """Tests each of `datasets` ({name: dataset}) on its head, or on the head heads[name] through that head's
    rows of its classes (a Kinetics version on a k710 head: test_heads); rank 0 prints a table and writes it
    to `out` (JSON), each result with its head and `guard`: whether training left validation videos out."""
    heads = {n: (heads or {}).get(n, n) for n in datasets}
    rows = {n: None if heads[n] == n else kinetics.label_rows(n, ds.classes, label_maps[heads[n]])
            for n, ds in datasets.items()}  # before any test: a version the head lacks is an error at once
    results = {n: evaluate(model, ds, head=heads[n], rows=rows[n], batch_size=batch_sizes[heads[n]], rank=rank,
                           **kw) for n, ds in datasets.items()}
    if rank == 0:
        print("\ntest, softmax averaged over each clip's views:\n"
              "  dataset           top-1  top-5 mean-class  clips views failed")
        for n, r in results.items():
            top1, top5, mean_class = (100 * r[k] for k in ("top1", "top5", "mean_class_top1"))
            print(f"  {n:16s} {top1:6.1f} {top5:6.1f} {mean_class:10.1f} {r['clips']:6d} {r['views']:5d} "
                  f"{r['failed']:6d}" + (f"  (on the {heads[n]} head)" if heads[n] != n else ""))
        if out:
            try:  # a temporary file, renamed: a full disk leaves no eval.json cut short
                with open(f"{out}.tmp", "w") as f:
                    json.dump({n: {**r, "head": heads[n], "guard": guard} for n, r in results.items()}, f, indent=1)
                os.replace(f"{out}.tmp", out)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(f"{out}.tmp")
                sys.exit(f"error: cannot write {out}: {e.strerror or e} (the results are printed above)")
    return results


def test_heads(names, label_maps, versions, data_dir):
    """{test set: the head it is tested on}: a dataset on its own; k710 as each Kinetics version it was merged
    from (`versions`: those whose validation videos the run kept out of training), and such a version named
    alone on the k710 head (each through its rows: kinetics.label_rows). Another version, or one of them not
    in data_dir, is one line of error."""
    heads = {}
    for n in names:
        if n == "k710":
            heads.update(dict.fromkeys(versions, n))
        elif n in kinetics.VERSIONS and n not in label_maps and "k710" in label_maps:
            if n not in versions:  # its validation videos may be among k710's training videos
                sys.exit(f"error: the k710 run was built from {', '.join(versions)}, not {n}: {n}'s validation "
                         f"videos were not kept out of its training, so it is not tested on that head")
            heads[n] = "k710"
        else:
            heads[n] = n
    missing = [n for n, head in heads.items() if head == "k710" and not os.path.isdir(os.path.join(data_dir, n))]
    if missing or ("k710" in names and not versions):
        folders = ", ".join(f"{v}/" for v in missing or kinetics.VERSIONS)
        sys.exit(f"error: the k710 head is tested on {', '.join(versions) or 'the Kinetics versions'}, and {data_dir} "
                 f"has no {folders}: point --data_dir at the folder that holds them")
    return heads


def k710_versions(names, train_sets):
    """The Kinetics versions a k710 training set was merged from, recorded in the run's config; None without k710."""
    return kinetics.versions(train_sets[names.index("k710")].samples) if "k710" in names else None


def arguments(description):
    """The flags eval.py and features.py share."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt written by train.py")
    p.add_argument("--datasets", help="comma-separated datasets (default: the checkpoint's)")
    p.add_argument("--data_dir", help="data folder (default: the checkpoint's)")
    p.add_argument("--views", type=lambda v: tuple(int(n) for n in v.lower().split("x")),
                   help="CLIPSxCROPS, e.g. 1x3 (default: the dataset's; 1x3 for K400 and SSv2)")
    p.add_argument("--batch_size", type=int, default=8, help="videos per forward pass, with all their views")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--dtype", choices=list(runtime.DTYPES), help="autocast precision (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--video", help="one video or image file instead of the datasets")
    p.add_argument("--head", help="with --video: which dataset's classes (default: the first head)")
    p.add_argument("--split", default="val", choices=["train", "val"], help="the datasets' split")
    p.add_argument("--live", action="store_true", help="the live weights, not their moving average (--ema)")
    return p


def load(args):
    """-> (runtime, model on its device, the run's config, its label maps, the dataset names to use), with
    one line and exit status 1 for a file that is not a checkpoint of train.py or lacks a head asked for."""
    try:  # missing, empty, cut short, not a checkpoint, not train.py's: one line
        ckpt = checkpoints.read_file(args.ckpt)
        runtime.check_run_checkpoint(ckpt, args.ckpt)
    except ValueError as e:
        sys.exit(f"error: --ckpt {e}")
    run, label_maps = ckpt["config"], ckpt["label_maps"]
    names = (args.datasets or run["datasets"]).split(",")
    names = [args.head or names[0]] if args.video else names
    through_k710 = set(kinetics.VERSIONS) if "k710" in label_maps and not args.video else set()
    missing = set(names) - set(label_maps) - through_k710  # a Kinetics version is tested on a k710 head
    if missing:
        sys.exit(f"error: the checkpoint has heads {list(label_maps)}, not {missing}")
    if args.live:
        ckpt.pop("ema", None)
    rt = runtime.setup(args.device)
    # the load report says which weights: the moving average or the live ones
    model = M.TimeSformer.from_pretrained(ckpt, verbose=rt.master and not args.video).to(rt.device).eval()
    return rt, model, run, label_maps, names


def open_datasets(args, rt, run, label_maps, names, split="val"):
    """{name: dataset in eval mode} of one split, from the run's listings."""
    listings = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "listings")  # made by train.py
    try:
        datasets = {n: runtime.rank0_first(rt, data.build_dataset, n, args.data_dir or run["data_dir"],
                                           split, train=False, cache_dir=listings, **sizes(args, run, n))
                    for n in names}
    except data.DatasetError as e:
        sys.exit(f"error: {e}")
    if any(n in label_maps and ds.classes != label_maps[n] for n, ds in datasets.items()):
        sys.exit("error: the classes on disk differ from the ones the checkpoint was trained with")
    loaders.guard(datasets.values(), os.path.dirname(os.path.abspath(args.ckpt)))  # quarantined: failed, unread
    return datasets


def sizes(args, run, name):
    """The run's clip shape and its sampling of dataset `name` (train.py --sampling), and --views."""
    flags = argparse.Namespace(datasets=run["datasets"], recipe=run["recipe"], sampling=run.get("sampling", ""))
    return dict(frames=run["frames"], img_size=run["img_size"], views=args.views,
                sampling=recipes.sampling(flags, name))


def file_views(args, run, name):
    """uint8 (V, C, T, H, W): the test views of the file --video, as dataset `name` samples them."""
    try:
        return data.load_test_views(args.video, name, **sizes(args, run, name))
    except (*data.READ_ERRORS, data.DatasetError) as e:
        sys.exit(f"error: cannot read {args.video}: {e}")


def main(argv=None):
    p = arguments(__doc__)
    p.add_argument("--out", help="where to write the JSON (default: <ckpt folder>/eval.json)")
    args = p.parse_args(argv)
    rt, model, run, label_maps, names = load(args)
    normalize = data.Normalize(run["mean"], run["std"], rt.device)
    dtype = runtime.DTYPES[args.dtype or run["dtype"]]
    if args.video:  # top-5 classes of one file, its test views' softmax averaged
        x = file_views(args, run, names[0])  # (V, C, T, H, W) uint8
        with torch.inference_mode(), runtime.autocast(rt.device, dtype):
            prob = model(normalize(x.to(rt.device)), head=names[0]).float().softmax(-1).mean(0)
        for p, i in zip(*prob.topk(min(5, len(prob)))):
            print(f"{p.item():7.2%}  {label_maps[names[0]][i]}")
        return
    data_dir = args.data_dir or run["data_dir"]
    versions = run.get("k710_versions")
    if "k710" in label_maps and versions is None:  # a run from before the record: the versions on disk
        versions = kinetics.present(data_dir)
        print(f"warning: the checkpoint does not record which Kinetics versions k710 trained on; testing those in "
              f"{data_dir} ({', '.join(versions) or 'none'}): one it did not train on may hold its training videos")
    heads = test_heads(names, label_maps, versions, data_dir)
    datasets = open_datasets(args, rt, run, label_maps, list(heads), args.split)
    try:
        test_all(model, datasets, batch_sizes=dict.fromkeys(label_maps, args.batch_size), rank=rt.rank,
                 world=rt.world, heads=heads, label_maps=label_maps, guard=runtime.guard_state(run),
                 out=args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json"),
                 normalize=normalize, device=rt.device, dtype=dtype, workers=args.workers)
    except data.DatasetError as e:  # a version that the k710 head has no rows for
        sys.exit(f"error: {e}")
    runtime.teardown(rt)


if __name__ == "__main__":
    main()
