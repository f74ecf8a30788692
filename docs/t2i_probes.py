"""docs/t2i_probes.py — the single-round probes of docs/t2i.md, "Why fine-tuning does not help yet".

Each probe evaluates one model on the same 250 held-out images (every 4th prompt of graft_t2i's evaluation
list, seed 7) and prints the checker's accuracy, the reward and the foreground fraction (pixels whose
brightest channel is over 25% of full scale; rendered ground truth: about 0.13-0.15).

    python docs/t2i_probes.py sampler --N 50 --w 2             # the reference under another sampler
    python docs/t2i_probes.py raw                              # the pre-training run's raw weights, not the EMA
    python docs/t2i_probes.py train --data gt --w 1            # one round of training on ground-truth scenes
    python docs/t2i_probes.py train --data random --w 1        # ... on the reference's own samples, unselected
    python docs/t2i_probes.py train --data top --w 1           # ... on its per-prompt Top-8 of 32 (the vqa reward)
    python docs/t2i_probes.py train --data correct --w 1       # ... on its samples that pass the checker
    python docs/t2i_probes.py foreground --w 1                 # foreground of own samples vs ground truth

`train`: 64 training prompts (seed 0), the data below, 200 steps of Adam (lr 2e-4, batch 32) on
graft_t2i.train_on_accepted's loss (GRAFT, or P-GRAFT's shaped loss on x_s with --n_i), from the reference.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import acceptance  # noqa: E402
import common  # noqa: E402
import graft_t2i as gt  # noqa: E402
from t2i_world import draw_prompts  # noqa: E402

STATE = os.path.join(os.path.dirname(gt.DEFAULT_REF), "t2i_pretrain_state.pt")


def foreground(x):
    return float((x.max(1).values > -0.5).float().mean())                       # x (B, 3, S, S) in [-1, 1]


def evaluate(hi, lo, N_I, abar, args, tag):
    prompts = gt.eval_prompts(gt.parse_args([]))[::4][:250]
    x = gt.sample(hi, lo, prompts, abar, args.N, N_I, args.eta, args.w, 256, torch.Generator().manual_seed(7))
    r = gt.score(x["x0"], prompts, gt.get_reward("vqa"))
    print(f"{tag}: checker {gt.reward_checker(x['x0'], prompts).mean():.3f}, reward {r.mean():.3f}, "
          f"foreground {foreground(x['x0']):.4f}", flush=True)


def training_data(ref, abar, args):
    """(x_s or x_0 (n, 3, S, S), prompts) for one round on 64 training prompts."""
    fa = gt.parse_args(["--n_i", str(args.n_i)])
    chosen = draw_prompts(gt.finetune_pools(fa), 64, np.random.default_rng(0))
    if args.data in ("gt", "gt_blur"):
        prompts = [p for p in chosen for _ in range(8)]
        x = gt.render_prompts(prompts, np.random.default_rng(0), 32)              # (512, 3, 32, 32)
        return (TF.gaussian_blur(x, 3, 0.6) if args.data == "gt_blur" else x), prompts
    M = 8 if args.data == "random" else 32
    prompts = [p for p in chosen for _ in range(M)]
    res = gt.sample(ref, ref, prompts, abar, args.N, fa.N_I, args.eta, args.w, 256,
                    torch.Generator().manual_seed(0))
    if args.data == "random":
        acc = torch.arange(len(prompts))
    elif args.data == "top":
        acc = acceptance.accept(gt.score(res["x0"], prompts, gt.get_reward("vqa")), "top_k", K=8 * 64,
                                groups=np.repeat(np.arange(64), M))
    else:                                                                         # correct: the checker passes
        acc = acceptance.accept(gt.reward_checker(res["x0"], prompts), "threshold", tau=1.0)
    ok = gt.reward_checker(res["x0"][acc], [prompts[i] for i in acc]).mean()
    print(f"{args.data}: {len(acc)} training images, checker {ok:.3f}, foreground {foreground(res['x0'][acc]):.4f}")
    return res["x_s"][acc], [prompts[i] for i in acc]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["sampler", "raw", "train", "foreground"])
    p.add_argument("--N", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise")
    p.add_argument("--w", type=float, default=2.0, help="CFG guidance scale (rounds and evaluation)")
    p.add_argument("--data", choices=["gt", "gt_blur", "random", "top", "correct"], default="gt",
                   help="train: ground truth (gt_blur: Gaussian blur 0.6 px), or the reference's own samples")
    p.add_argument("--n_i", type=float, default=0.0, help="train: 0 GRAFT, > 0 P-GRAFT (stitched evaluation)")
    p.add_argument("--ref", default=gt.DEFAULT_REF, help="the reference checkpoint (a path or hf:org/repo/file)")
    args = p.parse_args()
    torch.manual_seed(0)
    ref, cfg = gt.load_reference(args.ref, torch.device("cpu"))
    abar = gt.make_abar(cfg)
    if args.probe == "sampler":
        return evaluate(ref, ref, 0, abar, args, f"reference, N {args.N}, eta {args.eta}, w {args.w}")
    if args.probe == "raw":
        for name in ("ema", "model"):
            net = gt.build_model(cfg)
            net.load_state_dict(common.load_checkpoint(STATE)["state_dicts"][name])
            evaluate(net.eval(), net, 0, abar, args, f"pre-training's {name} weights")
        return
    if args.probe == "foreground":
        args.data = "random"
        x, prompts = training_data(ref, abar, args)
        return print(f"ground truth of the same prompts: foreground "
                     f"{foreground(gt.render_prompts(prompts, np.random.default_rng(0), 32)):.4f}")
    x, prompts = training_data(ref, abar, args)
    fa = gt.parse_args(["--n_i", str(args.n_i), "--ft_steps", "200", "--ft_lr", "2e-4", "--guidance", str(args.w)])
    ft = gt.build_model(cfg)
    ft.load_state_dict(ref.state_dict())
    opt = torch.optim.Adam(ft.parameters(), lr=fa.ft_lr)
    gt.train_on_accepted(ft, opt, x, gt.tokenize(prompts), abar, fa, torch.Generator().manual_seed(0))
    evaluate(*gt.samplers(fa, ref, ft), abar, args, f"trained on {args.data} (n_i {args.n_i}, w {args.w})")


if __name__ == "__main__":
    main()
