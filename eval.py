"""
Multi-view testing of a trained checkpoint: temporal clips x spatial crops per video, softmax averaged.

    python eval.py --ckpt out/ckpt.pt                        # the checkpoint's own datasets and data folder
    python eval.py --ckpt out/ckpt.pt --datasets k400 --views 1x3
    torchrun --nproc_per_node=8 eval.py --ckpt out/ckpt.pt   # every clip counted once over all ranks
    python eval.py --ckpt out/ckpt.pt --video clip.mp4 --head k400   # top-5 class names for one file

A clip that cannot be decoded is never replaced by another: it is counted as failed and reported.
Top-1/top-5 are over the clips that decoded; "clips" is the whole validation set.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import data
import model as M


@torch.inference_mode()
def evaluate(model, dataset, *, head, device, mean, std, dtype=torch.float32, rank=0, world=1, batch_size=8,
             workers=2):
    """Top-1 / top-5 / per-class top-1 of `head` on `dataset` (built with train=False), over all ranks."""
    was_training = model.training
    model.eval()
    loader = data.build_eval_loader(dataset, batch_size=max(1, batch_size), rank=rank, world=world, workers=workers,
                                    pin_memory=device.type == "cuda")
    K = len(dataset.classes)
    hits = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, decoded, failed
    class_hits = torch.zeros(2, K, dtype=torch.float64, device=device)  # per class: top-1 hits, decoded
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    views = dataset.num_views
    for batch in loader:
        x = batch["x"]  # (B, V, C, T, H, W) uint8
        B, V = x.shape[:2]
        x = data.normalize(x.to(device, non_blocking=True), mean, std).flatten(0, 1)  # (B*V, C, T, H, W)
        with autocast:
            logits = model(x, head=head)
        prob = logits.float().softmax(dim=-1).view(B, V, K).mean(dim=1)  # average the views' softmax
        y, ok = batch["y"].to(device), batch["ok"].to(device)
        top = prob.topk(min(5, K), dim=-1).indices  # (B, 5)
        hit1 = (top[:, 0] == y) & ok
        hit5 = (top == y[:, None]).any(dim=-1) & ok
        hits += torch.stack([hit1.sum(), hit5.sum(), ok.sum(), (~ok).sum()]).double()
        class_hits[0].index_add_(0, y[ok], hit1[ok].double())
        class_hits[1].index_add_(0, y[ok], torch.ones_like(y[ok], dtype=torch.float64))
    if world > 1:
        dist.all_reduce(hits)
        dist.all_reduce(class_hits)
    model.train(was_training)
    top1, top5, decoded, failed = hits.tolist()
    per_class = (class_hits[0] / class_hits[1].clamp(min=1)).tolist()
    seen = class_hits[1] > 0
    return {"top1": top1 / max(decoded, 1), "top5": top5 / max(decoded, 1), "clips": int(decoded + failed),
            "failed": int(failed), "views": views,
            "mean_class_top1": (class_hits[0][seen] / class_hits[1][seen]).mean().item() if seen.any() else 0.0,
            "per_class_top1": {dataset.classes[i]: round(a, 4) for i, a in enumerate(per_class) if seen[i]}}


def predict_file(model, path, *, head, spec_name, frames, img_size, device, mean, std, classes, k=5):
    """Top-k (class name, probability) for one video or image, averaged over the dataset's test views."""
    x = data.load_test_views(path, spec_name, frames=frames, img_size=img_size)  # (V, C, T, H, W) uint8
    with torch.inference_mode():
        prob = model(data.normalize(x.to(device), mean, std), head=head).float().softmax(-1).mean(0)
    p, i = prob.topk(min(k, prob.numel()))
    return [(classes[j], v) for j, v in zip(i.tolist(), p.tolist())]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="a ckpt.pt written by train.py")
    p.add_argument("--datasets", help="comma-separated datasets to test (default: the checkpoint's)")
    p.add_argument("--data_dir", help="data folder (default: the checkpoint's)")
    p.add_argument("--views", help="CLIPSxCROPS, e.g. 1x3 (default: per dataset, as the paper: 1x3 for K400 and SSv2)")
    p.add_argument("--batch_size", type=int, default=8, help="videos per forward pass (each with all its views)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="autocast precision (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--out", help="where to write the JSON (default: <ckpt folder>/eval.json)")
    p.add_argument("--video", help="predict one video or image file instead of testing datasets")
    p.add_argument("--head", help="with --video: which dataset's classes (default: the only / first head)")
    args = p.parse_args(argv)
    if not os.path.exists(args.ckpt):
        sys.exit(f"error: no checkpoint at {args.ckpt}; train one with train.py or pass --ckpt")
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device == "auto":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    run = ckpt["config"]
    model = M.from_pretrained(ckpt, verbose=False).to(device).eval()
    label_maps = ckpt["label_maps"]
    del ckpt
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or run["dtype"]]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16
    mean, std = [float(v) for v in run["mean"].split(",")], [float(v) for v in run["std"].split(",")]

    if args.video:
        head = args.head or run["datasets"].split(",")[0]
        if head not in label_maps:
            sys.exit(f"error: --head {head!r} is not one of the checkpoint's heads {list(label_maps)}")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            top = predict_file(model, args.video, head=head, spec_name=head, frames=run["frames"],
                               img_size=run["img_size"], device=device, mean=mean, std=std, classes=label_maps[head])
        for name, prob in top:
            print(f"{prob:7.2%}  {name}")
        return

    names = (args.datasets or run["datasets"]).split(",")
    unknown = [n for n in names if n not in label_maps]
    if unknown:
        sys.exit(f"error: the checkpoint has no head for {unknown}; it was trained on {list(label_maps)}")
    views = tuple(int(v) for v in args.views.lower().split("x")) if args.views else None
    results = {}
    for n in names:
        try:
            ds = data.build_dataset(n, args.data_dir or run["data_dir"], "val", frames=run["frames"],
                                    img_size=run["img_size"], train=False, views=views)
        except data.DatasetError as e:
            sys.exit(f"error: {e}")
        if ds.classes != label_maps[n]:
            sys.exit(f"error: the label map of {n} on disk differs from the one the checkpoint was trained with")
        results[n] = evaluate(model, ds, head=n, device=device, dtype=dtype, mean=mean, std=std, rank=rank,
                              world=world, batch_size=args.batch_size, workers=args.workers)
    if rank == 0:
        print(f"{'dataset':16s} {'top-1':>7s} {'top-5':>7s} {'mean-class':>10s} {'clips':>7s} {'failed':>7s} {'views':>6s}")
        for n, r in results.items():
            print(f"{n:16s} {100 * r['top1']:7.2f} {100 * r['top5']:7.2f} {100 * r['mean_class_top1']:10.2f} "
                  f"{r['clips']:7d} {r['failed']:7d} {r['views']:6d}")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
