"""
The training recipes, side by side. A recipe sets the defaults of train.py's flags; a flag given on the
command line wins. `python train.py` runs `demo`; naming --datasets without --recipe runs `cover`.
"""

RECIPES = {
    # The built-in demo sets (demo.py), a small model from scratch, fp32 on a CPU in a few minutes.
    "demo": dict(datasets="demo_kinetics,demo_ssv2,demo_imagenet", weights="demo_ssv2=2", model="demo",
                 img_size=32, frames=8, batch_size=32, optimizer="adamw", lr=1e-3, min_lr=1e-5,
                 weight_decay=0.05, warmup_steps=30, max_steps=1200, eval_every=600, save_every=600,
                 dtype="fp32", workers=2, drop_path=0.0, mean="0.45,0.45,0.45", std="0.225,0.225,0.225"),
    # CoVeR on real data, with the official TimeSformer K400 recipe where the paper gives one: SGD with
    # nesterov momentum, lr 0.005, weight decay 1e-4, global batch 64, 8x224 clips; round robin.
    "cover": dict(datasets="k400,ssv2,in21k", weights="", model="base", img_size=224, frames=8, batch_size=64,
                  optimizer="sgd", lr=0.005, min_lr=0.0, weight_decay=1e-4, warmup_steps=1000,
                  max_steps=60_000, eval_every=5000, save_every=1000, dtype="bf16", workers=8, drop_path=0.1,
                  mean="0.45,0.45,0.45", std="0.225,0.225,0.225"),
}
