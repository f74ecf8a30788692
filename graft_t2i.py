"""graft_t2i.py — GRAFT / P-GRAFT for text-to-image (arXiv 2510.02692's headline experiment), offline.

    python graft_t2i.py --n_i 0.25            # P-GRAFT from the shipped reference model
    python graft_t2i.py --n_i 0               # GRAFT
    python graft_t2i.py --n_i 0.25 --rp       # RP-GRAFT (reverse stitching, the paper's ablation)
    python graft_t2i.py --algo ddpo           # the policy-gradient baseline
    python graft_t2i.py --eval_only           # the reference model on the held-out prompts
    python graft_t2i.py --measure_variance    # E[Var(r(X_0) | X_t)] over t (docs/method.md §3)
    python graft_t2i.py --pretrain --max_minutes 100   # pre-train (resumable), then export the EMA weights
    python graft_t2i.py --preset sd2 --n_i 0.25 --reward vqascore --device cuda --amp   # the paper's setting

The world is t2i_world.py: 32x32 scenes of coloured shapes, prompts of six GenEval-like categories, a fixed
split of compositions (pre-training and fine-tuning see the training prompts, evaluation held-out ones).
The model (t2i_unet.py) is a text-conditional UNet with classifier-free guidance, sampled by DDIM; with
`--preset sd2` it is Stable Diffusion 2 from the Hugging Face Hub (sd2.py) with a LoRA adapter. Per round,
P prompts x M images are drawn, each prompt's Top-K by reward (VQAScore's analogue, t2i_vqa.py, or the
programmatic checker) is kept, and the model is fine-tuned on them: on the images (GRAFT, paper Alg. 1) or on
the intermediate states x_s, only for t > s (P-GRAFT, paper Alg. 2). The reward, an independent judge and the
checker's accuracy are reported side by side, with a per-prompt diversity figure, so a hacked reward shows.
"""
import argparse
import functools
import hashlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import acceptance
import common
import distributed
import pretraining
from t2i_unet import T2IUNet
import sd2
from t2i_world import (check_batch, diversity, draw_prompts, eval_prompt_list, in_grammar, metrics, parse_prompt,
                       read_prompt_file, render_prompts, save_grid, split_prompts, to_uint8, to_world, tokenize,
                       vocabulary)

# -- config: presets, flags, the derived quantities printed at start -----------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_REF = os.path.join(HERE, "checkpoints", "t2i_world_cpu.pt")
VQA = os.path.join(HERE, "checkpoints", "t2i_vqa_{}.pt")
SD2_PROMPTS = os.path.join(HERE, "data", "t2i_prompts", "{}.txt")       # GenAI-Bench-style, data/t2i_prompts/

PRESETS = {
    # the default run (P-GRAFT, 4 rounds of 16 prompts x 32 images, 1,000 evaluation images) is sized for
    # 30 minutes on 2 CPU cores (docs/t2i.md has the measured times)
    "cpu": dict(image_size=32, ch=24, ch_mult="1,2,2", N=20, guidance=2.0, prompts_per_round=16, M=32, K=8,
                rounds=4, ft_steps=100, batch_size=32, lr=5e-4, ema_decay=0.999, train_steps=200_000,
                n_eval=1000),
    # a GPU-sized run (64x64 scenes, a wider UNet, more prompts and samples): untested
    "paper": dict(image_size=64, ch=64, ch_mult="1,2,2", N=50, guidance=3.0, prompts_per_round=64, M=64, K=16,
                  rounds=8, ft_steps=1000, batch_size=128, lr=2e-4, ema_decay=0.9999, train_steps=400_000,
                  n_eval=5000),
    # the paper's setting: SD2-base from the Hub, LoRA, the Top-10 of 100 images per prompt, DDIM 50 steps at
    # w 7.5 (docs/t2i.md "Stable Diffusion 2" has what it costs); the model-size flags do not apply
    "sd2": dict(image_size=512, ch=1, ch_mult="1", N=50, guidance=7.5, prompts_per_round=32, M=100, K=10,
                rounds=1, ft_steps=1000, batch_size=8, lr=0.0, ema_decay=0.0, train_steps=0, n_eval=800),
}
# the settings a fine-tuning run's state.pt must share with the command that resumes it
RESUME_KEYS = ("algo", "n_i", "rp", "M", "K", "prompts_per_round", "sample_from", "ft_steps", "ft_lr",
               "ft_ema", "ft_loss", "reward", "N", "eta", "guidance", "seed", "batch_size", "ddpo_lr",
               "ddpo_batch", "ddpo_steps_frac", "ddpo_clip", "ddpo_buffer", "prompts")


class Parser(argparse.ArgumentParser):
    def error(self, message):                                  # one line, not the usage block
        raise SystemExit(f"graft_t2i: error: {message}")


def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # method (paper Alg. 1-2, docs/method.md §2-4) and what to run
    a("--algo", choices=["graft", "ddpo"], default="graft", help="rejection-sampling fine-tuning or DDPO")
    a("--n_i", type=float, default=0.0, help="P-GRAFT switch: N_I = round(n_i N); 0 is plain GRAFT")
    a("--rp", action="store_true", help="RP-GRAFT: reference above s, fine-tuned model below (ablation)")
    a("--reward", default=None, help="fine-tuning reward: vqa (VQAScore's analogue, t2i_vqa.py), checker "
      "(the 0/1 programmatic check; then the evaluation's checker is the reward itself), vqascore / "
      "vqascore_xxl (VQAScore with CLIP-FlanT5-XL / -XXL via t2v-metrics; default with --preset sd2)")
    a("--eval_only", action="store_true", help="only evaluate the reference model")
    a("--measure_variance", action="store_true", help="E[Var(r(X_0)|X_t)] on a grid of n_i (var_P x var_R)")
    a("--var_P", type=int, default=64, help="--measure_variance: intermediate states per n_i")
    a("--var_R", type=int, default=8, help="--measure_variance: continuations per state")
    a("--pretrain", action="store_true", help="pre-train a reference model (resumable), then export it")
    a("--export", action="store_true", help="only export the pre-training run's EMA weights")
    a("--export_to", default=DEFAULT_REF, help="where --pretrain / --export write the shipped checkpoint")
    a("--preset", choices=PRESETS, default="cpu", help="size and budget preset; flags below override it")
    a("--ref", default=DEFAULT_REF, help="reference checkpoint: a path or hf:org/repo/file")
    a("--out", default=None, help="output folder (default runs/t2i_<method>)")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    a("--amp", action="store_true", help="bf16 autocast (GPU)")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--seed", type=int, default=0, help="seed: a CPU run is reproducible")
    # Stable Diffusion 2 (--preset sd2, sd2.py): weights from the Hub, a LoRA adapter is what is fine-tuned
    a("--repo", default="stabilityai/stable-diffusion-2-1-base", help="--preset sd2: the Hub repo (diffusers "
      "layout; stabilityai/stable-diffusion-2-1 is the 768 px v-prediction model, mirrors work too)")
    a("--revision", default=None, help="--preset sd2: a branch, tag or commit of --repo")
    a("--lora_rank", type=int, default=4, help="--preset sd2: LoRA rank r on the attention projections")
    a("--lora_alpha", type=float, default=4.0, help="--preset sd2: LoRA alpha (the update is alpha / r B A x)")
    a("--lora_dropout", type=float, default=0.0, help="--preset sd2: dropout on the LoRA input")
    a("--grad_ckpt", action="store_true", help="gradient checkpointing in SD2's UNet (memory for compute)")
    # prompts: the world's split, or files of one prompt per line ('#' comments and blanks skipped)
    a("--prompts", help="fine-tuning prompts file (default: the training prompts, category-balanced)")
    a("--eval_prompts", help="evaluation prompts file (default: the held-out prompts)")
    a("--prompts_per_round", type=int, help="P: prompts drawn per round")
    # sampler: DDIM with classifier-free guidance (docs/method.md §1, §3)
    a("--N", type=int, help="DDIM steps over common.time_grid(T, N); NFE per image N (x2 with guidance)")
    a("--eta", type=float, default=1.0, help="DDIM noise: 1 = ancestral Gaussian steps (DDPO needs them), "
      "0 = deterministic (then Var(r | x_s) = 0 below the switch)")
    a("--guidance", type=float, help="CFG w: eps_u + w (eps_c - eps_u); 1 = conditional only")
    a("--sample_batch", type=int, default=256, help="images per sampler batch")
    # rejection sampling per prompt and fine-tuning
    a("--M", type=int, help="images drawn per prompt and round")
    a("--K", type=int, help="images accepted per prompt (per-prompt Top-K of M)")
    a("--rounds", type=int, help="GRAFT rounds (or DDPO epochs of P x M samples)")
    a("--sample_from", choices=["current", "reference"], default="current",
      help="GRAFT: draw each round from the current model (tilts compound) or the reference (one tilt)")
    a("--ft_steps", type=int, help="fine-tuning gradient steps per round")
    a("--ft_lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    a("--ft_loss", choices=["eps", "v"], default="eps", help="fine-tuning loss: eps (DDPM's, shaped) or v "
      "(the same weighted by abar_s / abar_t: count and layout, decided at high noise, weigh more)")
    a("--ft_ema", type=float, default=0.0, help="GRAFT: each round ends on its iterates' EMA (decay)")
    a("--batch_size", type=int, help="images per pre-training / fine-tuning step")
    a("--ddpo_lr", type=float, default=1e-5, help="DDPO learning rate (full fine-tuning)")
    a("--ddpo_batch", type=int, default=32, help="trajectories per DDPO gradient step")
    a("--ddpo_steps_frac", type=float, default=0.25, help="fraction of the trainable steps per trajectory")
    a("--ddpo_clip", type=float, default=1e-4, help="PPO clip (tiny: log-probs are per-dimension means)")
    a("--ddpo_buffer", type=int, default=32, help="per-prompt reward buffer (PerPromptStatTracker): "
      "its stats once it holds 16, the batch's before")
    # evaluation on held-out prompts
    a("--n_eval", type=int, help="images per evaluation (balanced over categories)")
    a("--eval_per_prompt", type=int, default=4, help="images per evaluation prompt (seeds, for diversity)")
    # model (must match the checkpoint) and pre-training
    a("--image_size", type=int, help="image side in pixels (the world renders 32, 48 or 64)")
    a("--ch", type=int, help="UNet base width")
    a("--ch_mult", help="UNet width multipliers per resolution, comma-separated")
    a("--T", type=int, default=1000, help="diffusion time steps of the training schedule")
    a("--schedule", default="cosine", choices=["cosine", "linear"], help="noise schedule")
    a("--p_uncond", type=float, default=0.1, help="pre-training prompt dropout to the empty prompt (CFG)")
    a("--lr", type=float, help="pre-training learning rate (AdamW, 1,000 warm-up steps)")
    a("--ema_decay", type=float, help="EMA decay of pre-training weights")
    a("--train_steps", type=int, help="pre-training steps in total (resumable)")
    a("--max_minutes", type=float, default=None, help="stop pre-training after this long (resumable)")
    return p


def parse_args(argv=None):
    """Flags, the preset's values for those left unset, one-line errors, and the derived N_I and ch_mult."""
    p = build_parser()
    args = p.parse_args(argv)
    unset = {k: v for k, v in PRESETS[args.preset].items() if getattr(args, k) is None}
    vars(args).update(unset)                                   # flags left unset take the preset's values
    args.sd2 = args.preset == "sd2"
    args.reward = args.reward or ("vqascore" if args.sd2 else "vqa")
    bad = [k for k in ("M", "K", "N", "T", "rounds", "n_eval", "batch_size", "sample_batch",
                       "prompts_per_round", "var_P", "var_R", "eval_per_prompt", "ddpo_batch", "ddpo_buffer",
                       "image_size", "ch")
           if getattr(args, k) <= 0]
    checks = [(bad, f"--{bad[0] if bad else ''} must be positive"),
              (args.K > args.M, f"--K {args.K} > --M {args.M}: cannot keep more images than are drawn"),
              (not 0 <= args.n_i < 1, f"--n_i must be in [0, 1), got {args.n_i}"),
              (args.rp and args.n_i == 0, "--rp needs --n_i > 0 (else the reference does every step)"),
              (args.N > args.T, f"--N {args.N} > --T {args.T}"),
              (not 0 <= args.eta <= 1, "--eta must be in [0, 1]"),
              (not 0 <= args.ft_ema < 1, "--ft_ema must be in [0, 1)"),
              (not 0 < args.ddpo_steps_frac <= 1, "--ddpo_steps_frac in (0, 1]"),
              (args.lora_rank <= 0 or not 0 <= args.lora_dropout < 1 or not math.isfinite(args.lora_alpha),
               "--lora_rank must be positive, --lora_dropout in [0, 1), --lora_alpha finite"),
              (args.sd2 and (args.pretrain or args.export), "--preset sd2 comes pre-trained from the Hub"),
              (args.batch_size % int(os.environ.get("WORLD_SIZE", "1")) != 0,
               "--batch_size must be a multiple of torchrun's number of processes"),
              (args.reward not in REWARDS, f"unknown --reward {args.reward!r}; one of {', '.join(REWARDS)}")]
    for failed, message in checks:
        if failed:
            p.error(message)
    try:
        args.ch_mult = tuple(int(m) for m in str(args.ch_mult).split(","))
    except ValueError:
        p.error(f"--ch_mult must be comma-separated integers, got {args.ch_mult!r}")
    args.N_I = round(args.n_i * args.N)
    return args


def model_config(args):
    """What a checkpoint must record to be rebuilt."""
    return dict(image_size=args.image_size, ch=args.ch, ch_mult=list(args.ch_mult), n_res=1, attn_res=[16, 8],
                patch=2, vocab_size=len(vocabulary()), d_text=64, text_layers=2, heads=4, length=10, T=args.T,
                schedule=args.schedule)


def nfe_per_image(args):
    return args.N * (1 if args.guidance == 1 else 2)                     # CFG: two passes per step


# -- data: prompts of the world's split, or a user's file; scenes rendered on the fly ------------------------

def read_prompts(path, args):
    """t2i_world.read_prompt_file: a world reward needs the grammar, the world's model its words (SD2 reads any
    text); a problem (a missing file, a line outside the grammar) is one line."""
    try:
        return read_prompt_file(path, grammar=args.reward in WORLD_REWARDS, words=not args.sd2)
    except (OSError, ValueError) as e:
        raise SystemExit(f"graft_t2i: {e}") from None


def finetune_pools(args):
    """The world's training prompts (category-balanced), or a file's: --prompts, SD2's shipped list."""
    path = args.prompts or (SD2_PROMPTS.format("train") if args.sd2 and args.reward not in WORLD_REWARDS
                            else None)
    return {"file": read_prompts(path, args)} if path else {c: v["train"] for c, v in split_prompts().items()}


def eval_prompts(args):
    """n_eval held-out prompts, eval_per_prompt copies each, or a file's cycled (--eval_prompts, SD2's)."""
    path = args.eval_prompts or (SD2_PROMPTS.format("eval") if args.sd2 and args.reward not in WORLD_REWARDS
                                 else None)
    return eval_prompt_list(args.n_eval, args.eval_per_prompt, read_prompts(path, args) if path else None)


# -- model: text encoder + UNet (t2i_unet.py), or Stable Diffusion 2 with LoRA (sd2.py) ---------------------

def build_model(cfg):
    return T2IUNet(**cfg)


def load_sd2(args, device):
    """SD2 from the Hub with a zero-initialised LoRA adapter (sd2.py): (the reference = adapter off, its cfg).
    The fine-tuned model is the same UNet with the adapter on (finetuned_copy)."""
    try:
        model = sd2.load_sd2(args.repo, args.revision, torch.bfloat16 if args.amp else torch.float32, device)
    except sd2.SD2LoadError as e:
        raise SystemExit(f"graft_t2i: {e}")
    model.unet.gradient_checkpointing = args.grad_ckpt
    lora = model.add_lora(args.lora_rank, args.lora_alpha, args.lora_dropout)
    print(f"LoRA rank {args.lora_rank}: {sum(q.numel() for q in lora.parameters()):,} trainable parameters")
    return model.adapter(False), {"sd2": args.repo, "revision": args.revision, "lora_rank": args.lora_rank,
                                  "image_size": 8 * model.latent_shape[-1], "T": len(model.abar) - 1}


def finetuned_copy(ref, ref_cfg, device):
    """(model, what is trained and saved): SD2's adapter-on view of the one UNet (the LoRA weights), or a full
    copy of the world's model."""
    if "sd2" in ref_cfg:
        return ref.sd2.adapter(True), ref.sd2.lora
    ft = build_model(ref_cfg).to(device)
    ft.load_state_dict(ref.state_dict())
    return ft, ft


def load_reference(ref, device):
    """(model, cfg) from a path or hf:org/repo/file; missing, corrupt or mismatched: one error line."""
    try:
        ckpt = common.load_checkpoint(ref)
        cfg = ckpt["config"].get("model")
        if not isinstance(cfg, dict):
            raise common.CheckpointError(f"{ref!r} records no model config (not a graft_t2i checkpoint)")
        try:
            model = build_model(cfg)
        except (TypeError, ValueError) as e:
            raise common.CheckpointError(f"{ref!r}: a model config this script cannot build ({e})") from None
        sd = ckpt["state_dicts"].get("ema") or ckpt["state_dicts"].get("model")
        if not isinstance(sd, dict):
            raise common.CheckpointError(f"{ref!r} has no 'ema' or 'model' weights")
        common.load_state(model, sd, f"checkpoint {ref!r}")
    except common.CheckpointError as e:
        raise SystemExit(f"graft_t2i: {e}")
    return model.to(device).eval(), cfg


# -- diffusion: schedule, shaped loss, DDIM with CFG and P-GRAFT's stitching ---------------------------------

def make_abar(cfg, ref=None):
    if "sd2" in cfg:
        return ref.sd2.abar.cpu()                                                    # (T+1,) the Hub's schedule
    return torch.tensor(common.noise_schedule(cfg["schedule"], cfg["T"]), dtype=torch.float32)  # (T+1,)


def shaped_loss(net, x_s, ids, abar, t_lo, t_hi, abar_s=1.0, gen=None, p_uncond=0.0, v=False, shard=(0, 1)):
    """docs/method.md §3 on images x_s (B, 3, S, S) that live at time s, t uniform in [t_lo, t_hi]:
        x_t = sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) eps',
        loss = mean |eps_theta(x_t, t, y) / c_t - eps'|^2,
        c_t = sqrt((1 - abar_t) / (1 - abar_t/abar_s));  abar_s = 1 (x_s = x_0) is DDPM's loss.
    p_uncond: the prompt y becomes the empty prompt (all padding) with this probability (for CFG).
    v: each term weighted by abar_s / abar_t, v-prediction's loss (x_s error weighted 1 + SNR, not SNR).
    shard (rank, W): the draws are the whole batch's, the loss is this rank's every W-th example (DDP)."""
    B, dev = len(x_s), x_s.device
    abar = abar.to(dev)
    t = torch.randint(t_lo, t_hi + 1, (B,), generator=gen).to(dev)                 # (B,)
    eps = torch.randn(x_s.shape, generator=gen).to(dev)                             # eps' (B, C, S, S)
    drop = (torch.rand(B, generator=gen) < p_uncond).to(dev)                        # (B,) empty prompt
    ids = ids.masked_fill(drop[:, None], 0)                                         # (B, L)
    if shard[1] > 1:
        x_s, ids, t, eps = (a[shard[0]::shard[1]] for a in (x_s, ids, t, eps))
        B = len(x_s)
    ratio = (abar[t] / abar_s).view(B, 1, 1, 1)
    c_t = ((1 - abar[t]).view(B, 1, 1, 1) / (1 - ratio)).sqrt()
    pred = net(ratio.sqrt() * x_s + (1 - ratio).sqrt() * eps, t.float(), ids)      # (B, 3, S, S)
    w = 1 / ratio if v else 1.0                                                     # (B, 1, 1, 1) or 1
    return (w * (pred / c_t - eps) ** 2).mean()


def guided_eps(net, x, t, ctx, null, w, amp=False):
    """Classifier-free guidance eps_u + w (eps_c - eps_u) in one batch; w = 1: one conditional pass."""
    with common.autocast(x.device, amp):
        if w == 1:
            return net(x, t, ctx=ctx).float()
        both = tuple(map(torch.cat, zip(ctx, null))) if isinstance(ctx, tuple) else torch.cat([ctx, null])
        eps_c, eps_u = net(torch.cat([x, x]), torch.cat([t, t]), ctx=both).float().chunk(2)   # (B, 3, S, S)
    return eps_u + w * (eps_c - eps_u)


def contexts(net, ids, w):
    """The prompt's text context and, with guidance, the empty prompt's."""
    dev = next(net.parameters()).device
    return net.encode(ids.to(dev)), (net.encode(net.tokenize([""] * len(ids)).to(dev)) if w != 1 else None)


def ddim_mean_std(eps, x_t, abar, t, s, eta, clip=True):
    """DDIM's Gaussian p(x_s | x_t) for s < t: x0_hat from eps (clipped to [-1, 1] for pixels, not for SD2's
    latents), std = eta * DDPM's posterior std; eta = 1 is an ancestral step, eta = 0 deterministic.
    abar_0 = 1, so the step to 0 returns x0_hat."""
    a_t, a_s = abar[t], abar[s]
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x0 = x0.clamp(-1, 1) if clip else x0
    std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
    return a_s.sqrt() * x0 + (1 - a_s - std ** 2).clamp(min=0).sqrt() * eps, std


def gaussian_logp(x, mean, std):
    """log N(x; mean, std^2) averaged over the dimensions (DDPO's convention, docs/method.md §4) -> (B,); 0
    for a deterministic step (std 0), which is never trained."""
    if float(std) == 0:
        return torch.zeros(len(x))
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * np.log(2 * np.pi)   # (B, 3, S, S)
    return lp.flatten(1).mean(1)


def ddim_steps(net, x, ids, abar, N, k_from, k_to, eta, w, gen, amp=False, traj=None):
    """x_{tau_k_from} -> x_{tau_k_to} by `net` on the N-step grid; the step noise comes from `gen` (on the
    CPU, drawn even where std = 0, so a seed gives the same noise on any device and at any eta). traj, if a
    list, receives (x_new, log p(x_new | x)) of every step: DDPO's data."""
    tau, dev = common.time_grid(len(abar) - 1, N), next(net.parameters()).device
    ctx, null = contexts(net, ids, w) if k_from > k_to else (None, None)
    for k in range(k_from, k_to, -1):
        t = torch.full((len(x),), float(tau[k]), device=dev)
        eps = guided_eps(net, x.to(dev), t, ctx, null, w, amp).cpu()               # (B, 3, S, S)
        mean, std = ddim_mean_std(eps, x, abar, tau[k], tau[k - 1], eta, net.clip_x0)
        x_new = mean + std * torch.randn(x.shape, generator=gen)
        if traj is not None:
            traj.append((x_new, gaussian_logp(x_new, mean, std)))
        x = x_new
    return x


KEEP_PX = 128         # images are kept, after scoring, at most this large (SD2's 512 px are 3 MB each)


def decode(net, z, amp=False):
    """Final states -> images in [-1, 1]: the world's pixels as they are, SD2's latents through its VAE."""
    with common.autocast(next(net.parameters()).device, amp):
        return net.decode(z).float().cpu()                                          # (B, 3, H, W)


def finish(out, net, z0, prompts, score_fn, amp):
    """Decode, score at full size (score_fn(images, prompts) -> (B,), if given), keep at most KEEP_PX px."""
    x0 = decode(net, z0, amp)
    if score_fn is not None:
        out["r"].append(score_fn(x0, prompts))
    out["x0"].append(F.interpolate(x0, size=KEEP_PX, mode="area") if x0.shape[-1] > KEEP_PX else x0)


@torch.no_grad()
def sample(net_hi, net_lo, prompts, abar, N, N_I=0, eta=1.0, w=1.0, batch=256, gen=None, amp=False,
           score_fn=None):
    """Images for `prompts` from the stitched sampler of paper Alg. 2: net_hi takes the steps from tau_k with
    k > N_I (x_T down to x_s, s = tau_{N_I}), net_lo the rest. Reference: (ref, ref); P-GRAFT: (fine-tuned,
    ref); RP-GRAFT: (ref, fine-tuned); GRAFT: N_I = 0. Returns {'x0': images (M, 3, H, W), 'z0': the final
    states, 'x_s', and 'r' (M,) with score_fn}: z0 and x_s (M, C, S, S) are pixels in the world and latents
    for SD2; x_s is P-GRAFT's data."""
    ids_all, out = net_hi.tokenize(prompts), {"x0": [], "z0": [], "x_s": []} | ({"r": []} if score_fn else {})
    for b in range(0, len(prompts), batch):
        ids = ids_all[b:b + batch]
        if not distributed.mine(b // batch, (len(ids), *net_hi.latent_shape), N + 1, gen):   # x_T, N steps
            continue
        x_T = torch.randn(len(ids), *net_hi.latent_shape, generator=gen)           # (B, C, S, S)
        x_s = ddim_steps(net_hi, x_T, ids, abar, N, N, N_I, eta, w, gen, amp)       # above s: net_hi
        z0 = ddim_steps(net_lo, x_s, ids, abar, N, N_I, 0, eta, w, gen, amp)        # below s: net_lo
        finish(out, net_lo, z0, prompts[b:b + batch], score_fn, amp)
        out["z0"].append(z0), out["x_s"].append(x_s)
    return distributed.gather(out)


@torch.no_grad()
def sample_trajectories(net, prompts, abar, N, w, batch=256, gen=None, amp=False, score_fn=None):
    """DDPO's data (eta = 1): images, trajectories (M, N+1, C, S, S) from x_T, step log-probs (M, N), and
    with score_fn the rewards 'r' (M,)."""
    ids_all, out = net.tokenize(prompts), {"x0": [], "traj": [], "logp": []} | ({"r": []} if score_fn else {})
    for b in range(0, len(prompts), batch):
        if not distributed.mine(b // batch, (len(ids_all[b:b + batch]), *net.latent_shape), N + 1, gen):
            continue
        x_T, steps = torch.randn(len(ids_all[b:b + batch]), *net.latent_shape, generator=gen), []
        z0 = ddim_steps(net, x_T, ids_all[b:b + batch], abar, N, N, 0, 1.0, w, gen, amp, steps)
        finish(out, net, z0, prompts[b:b + batch], score_fn, amp)
        out["traj"].append(torch.stack([x_T] + [x for x, _ in steps], 1))           # (B, N+1, 3, S, S)
        out["logp"].append(torch.stack([lp for _, lp in steps], 1))                 # (B, N)
    return distributed.gather(out)


@torch.no_grad()
def continue_from(net, x_s, prompts, abar, N, N_I, eta, w, batch=256, gen=None, amp=False):
    """Images finished by `net` from states x_s (M, C, S, S) at step N_I (the variance curve, §3)."""
    ids = net.tokenize(prompts)
    return torch.cat([decode(net, ddim_steps(net, x_s[b:b + batch], ids[b:b + batch], abar, N, N_I, 0, eta, w,
                                             gen, amp), amp) for b in range(0, len(prompts), batch)])


# -- rewards: reward(images (B, 3, H, W) in [-1, 1], prompts list[str]) -> (B,), built lazily ----------------

def reward_checker(images, prompts):
    """The programmatic checker's 0/1 (GenEval's analogue) as a reward."""
    return torch.tensor(check_batch(to_world(images), [parse_prompt(p) for p in prompts]), dtype=torch.float32)


def world_checker(images, prompts):
    """The checker's accuracy where the prompts are the world's, None for other text (SD2's prompt lists)."""
    return float(reward_checker(images, prompts).mean()) if all(map(in_grammar, prompts)) else None


def vqa_scorer(which, device):
    """t2i_vqa.load_scorer's P(yes) ('reward': VQAScore's analogue, 'judge': an independently trained one)."""
    path = VQA.format(which)
    if not os.path.isfile(path):
        raise SystemExit(f"graft_t2i: {path} does not exist (t2i_vqa.py makes it); use --reward checker")
    import t2i_vqa
    try:
        scorer = t2i_vqa.load_scorer(which, path=path, device=device)
    except common.CheckpointError as e:
        raise SystemExit(f"graft_t2i: {e}")
    return lambda images, prompts: scorer(to_world(images), prompts)


REWARDS = {"vqa": lambda args: vqa_scorer("reward", args.device), "checker": lambda args: reward_checker,
           "vqascore": lambda args: sd2.VQAScore("clip-flant5-xl", args.device),       # VQAScore itself
           "vqascore_xxl": lambda args: sd2.VQAScore("clip-flant5-xxl", args.device)}
WORLD_REWARDS = ("vqa", "checker")       # rewards that only understand the world's grammar


@functools.lru_cache(maxsize=None)
def get_reward(name, device="cpu"):
    """REWARDS[name] built once (a scorer loads its weights on first use)."""
    return REWARDS[name](argparse.Namespace(device=device))


@functools.lru_cache(maxsize=None)
def get_judge(device="cpu"):
    """The independent judge, or None while its checkpoint does not exist."""
    return vqa_scorer("judge", device) if os.path.isfile(VQA.format("judge")) else None


def reward_fn(args):
    """score(images, prompts) with the run's reward: what the sampler calls on each batch."""
    return functools.partial(score, reward_fn=get_reward(args.reward, args.device))


def score(images, prompts, reward_fn, what="reward"):
    """reward_fn's (B,) scores on the CPU; NaN or a wrong shape stops the run with one line (nothing written
    is lost: state.pt holds the last finished round)."""
    r = torch.as_tensor(reward_fn(images, prompts), dtype=torch.float32).cpu()
    if r.shape != (len(prompts),):
        raise SystemExit(f"graft_t2i: the {what} returned shape {tuple(r.shape)}, expected ({len(prompts)},)")
    if not torch.isfinite(r).all():
        raise SystemExit(f"graft_t2i: the {what} returned {int((~torch.isfinite(r)).sum())} NaN/inf values")
    return r


# -- fine-tuning: GRAFT / P-GRAFT / RP-GRAFT (paper Alg. 1-2) and DDPO (docs/method.md §4) -------------------

def method_name(args):
    return "ddpo" if args.algo == "ddpo" else "rpgraft" if args.rp else "pgraft" if args.N_I > 0 else "graft"


def samplers(args, ref, ft):
    """(net_hi, net_lo, N_I) of the fine-tuned sampler (docs/method.md §3): the fine-tuned model everywhere
    (GRAFT, DDPO), above s (P-GRAFT) or below s (RP-GRAFT)."""
    if args.algo == "ddpo" or args.N_I == 0:
        return ft, ft, 0
    return (ref, ft, args.N_I) if args.rp else (ft, ref, args.N_I)


def training_window(args, abar):
    """(t_lo, t_hi, abar_s). P-GRAFT: data x_s, t in (s, T], shaped loss; RP-GRAFT: x_0, t in [1, s]; GRAFT:
    x_0, t in [1, T]."""
    T, s = len(abar) - 1, int(common.time_grid(len(abar) - 1, args.N)[args.N_I])
    if args.rp:
        return 1, s, 1.0
    return (s + 1, T, float(abar[s])) if args.N_I > 0 else (1, T, 1.0)


def train_on_accepted(ft, opt, x_acc, ids_acc, abar, args, gen):
    """ft_steps of the shaped loss on the accepted states x_acc (K_total, 3, S, S) with their prompts' ids in
    the round's training window (no prompt dropout: the conditional model is what is fine-tuned). --ft_ema
    > 0: the round ends on the EMA of its iterates. Returns the gradient calls, one per (x_t, t) pair."""
    dev, (t_lo, t_hi, abar_s) = next(ft.parameters()).device, training_window(args, abar)
    params = [q for q in ft.parameters() if q.requires_grad]                # SD2: the LoRA weights
    avg = [q.detach().clone() for q in params] if args.ft_ema > 0 else []
    ft.train()
    for _ in range(args.ft_steps):
        idx = torch.randint(len(x_acc), (args.batch_size,), generator=gen)
        with common.autocast(dev, args.amp):                   # under torchrun: DDP, each rank its shard
            loss = shaped_loss(distributed.ddp(ft), x_acc[idx].to(dev), ids_acc[idx].to(dev), abar, t_lo, t_hi,
                               abar_s, gen, v=args.ft_loss == "v", shard=distributed.world())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if avg:
            torch._foreach_lerp_(avg, [q.detach() for q in params], 1 - args.ft_ema)
    with torch.no_grad():
        for q, a in zip(params if avg else [], avg):
            q.copy_(a)
    ft.eval()
    return args.ft_steps * args.batch_size


def graft_round(args, ref, ft, opt, abar, prompts, groups, gen):
    """Paper Alg. 1 / 2 for text-to-image: P x M images, their rewards, the Top-K of each prompt
    (acceptance.accept with groups = prompt index: stratum_quotas gives exactly K per prompt), training on
    the accepted x_s (P-GRAFT) or x_0 (GRAFT, RP-GRAFT).
    Returns (images, rewards, accepted, gradient calls)."""
    hi, lo, N_I = (ref, ref, args.N_I) if args.sample_from == "reference" else samplers(args, ref, ft)
    res = sample(hi, lo, prompts, abar, args.N, N_I, args.eta, args.guidance, args.sample_batch, gen, args.amp,
                 reward_fn(args))
    r = res["r"]
    acc = acceptance.accept(r, "top_k", K=args.K * args.prompts_per_round, groups=groups)
    data = res["z0"] if args.rp else res["x_s"]                              # x_s is z0 when N_I = 0
    return res["x0"], r, acc, train_on_accepted(ft, opt, data[acc], ft.tokenize(prompts)[acc], abar, args, gen)


class PerPromptStatTracker:
    """ddpo-pytorch's advantage normalisation: a running buffer of each prompt's last `size` rewards; they
    are standardised by the buffer's mean and std once it holds min_count, by the batch's before."""

    def __init__(self, size, min_count=16, buffers=None):
        self.size, self.min_count, self.buffers = size, min_count, buffers or {}

    def update(self, prompts, rewards):
        rewards, prompts = np.asarray(rewards, np.float64), np.asarray(prompts)
        adv = np.empty_like(rewards)
        for p in np.unique(prompts):
            mine = prompts == p
            buf = self.buffers[str(p)] = (self.buffers.get(str(p), []) + rewards[mine].tolist())[-self.size:]
            ref = rewards if len(buf) < self.min_count else np.asarray(buf)
            adv[mine] = (rewards[mine] - ref.mean()) / (ref.std() + 1e-6)
        return torch.tensor(adv, dtype=torch.float32)


def ddpo_update(ft, opt, res, adv, ids, abar, args, gen):
    """One inner epoch of PPO over the trajectories (docs/method.md §4): advantages clipped to +-5, the
    clipped surrogate of the guided policy's per-dimension-averaged log-probs, a random ddpo_steps_frac of
    the steps with a std > 0 (the last, to abar_0 = 1, is deterministic and skipped), gradients accumulated
    over the steps of a batch, grad clip 1. Returns the gradient calls (CFG's two passes count two). Under
    torchrun each rank takes every W-th trajectory of a batch and the gradients are summed over the ranks
    (several backward passes per step, so an all_reduce of their sum rather than DDP's per-backward one)."""
    dev, tau, N = next(ft.parameters()).device, common.time_grid(len(abar) - 1, args.N), args.N
    rank, world = distributed.world()
    stds = [float(ddim_mean_std(0, 0, abar, tau[N - j], tau[N - j - 1], 1)[1]) for j in range(N)]
    trainable = [j for j in range(N) if stds[j] > 0]
    n_steps, calls, adv = max(1, round(args.ddpo_steps_frac * len(trainable))), 0, adv.clamp(-5, 5)
    perm, passes = torch.randperm(len(adv), generator=gen), 1 if args.guidance == 1 else 2
    ft.train()
    for b in range(0, len(perm), args.ddpo_batch):
        idx = perm[b:b + args.ddpo_batch]
        n, idx = len(idx), idx[rank::world]                                  # this rank's trajectories
        opt.zero_grad(set_to_none=True)
        for j in [trainable[i] for i in torch.randperm(len(trainable), generator=gen)[:n_steps]]:
            k, x_t, x_next = N - j, res["traj"][idx, j].to(dev), res["traj"][idx, j + 1].to(dev)  # k -> k-1
            ctx, null = contexts(ft, ids[idx], args.guidance)
            eps = guided_eps(ft, x_t, torch.full((len(idx),), float(tau[k]), device=dev), ctx, null,
                             args.guidance, args.amp)
            mean, std = ddim_mean_std(eps, x_t, abar.to(dev), tau[k], tau[k - 1], 1.0, ft.clip_x0)
            ratio = torch.exp(gaussian_logp(x_next, mean, std).to(dev) - res["logp"][idx, j].to(dev))   # (B,)
            a = adv[idx].to(dev)
            terms = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.ddpo_clip, 1 + args.ddpo_clip))
            loss = terms.mean() if world == 1 else terms.sum() / n                # the whole batch's mean
            (loss / n_steps).backward()
            calls += n * passes
        distributed.sum_grads([q for q in ft.parameters() if q.requires_grad])
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
    ft.eval()
    return calls


def ddpo_round(args, ft, opt, abar, prompts, tracker, gen):
    res = sample_trajectories(ft, prompts, abar, args.N, args.guidance, args.sample_batch, gen, args.amp,
                              reward_fn(args))
    r = res["r"]
    grad = ddpo_update(ft, opt, res, tracker.update(prompts, r.numpy()), ft.tokenize(prompts), abar, args, gen)
    return res["x0"], r, torch.arange(len(prompts)), grad


def finetune(args, ref, ref_cfg, abar, pools, device):
    """The rounds: P prompts (seeded by round) x M images each, scored, accepted and trained on; state.pt
    after every round, so an interrupted run resumes from the last finished round and repeats the
    uninterrupted one."""
    ft, trained = finetuned_copy(ref, ref_cfg, device)                      # trained: what state.pt holds
    ft = common.maybe_compile(ft, args.compile)
    opt = torch.optim.Adam([q for q in ft.parameters() if q.requires_grad],
                           lr=args.ddpo_lr if args.algo == "ddpo" else args.ft_lr)
    path = os.path.join(args.out, "state.pt")
    key = {k: getattr(args, k) for k in RESUME_KEYS} | {"ref": args.ref}
    rounds, compute, buffers = [], dict(samples=0, nfe_sampling=0, grad_calls=0, wall_s=0.0), {}
    if os.path.exists(path):
        try:
            st = common.load_checkpoint(path)
            if st["config"].get("resume_key") != key:
                raise SystemExit(f"graft_t2i: {args.out} holds a run with other settings; use another --out")
            common.load_state(trained, st["state_dicts"]["model"], path)
            opt.load_state_dict(st["state_dicts"]["opt"])
        except common.CheckpointError as e:
            raise SystemExit(f"graft_t2i: {e}")
        rounds, compute, buffers = st["extra"]["rounds"], st["extra"]["compute"], st["extra"]["buffers"]
        print(f"resuming after round {len(rounds)}")
    tracker = PerPromptStatTracker(args.ddpo_buffer, buffers=buffers)
    P, M = args.prompts_per_round, args.M
    for rnd in range(len(rounds), args.rounds):
        t0, seed = time.time(), args.seed * 1_000_003 + rnd      # per-round seeding: a resume repeats exactly
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        chosen = draw_prompts(pools, P, np.random.default_rng(seed))
        prompts, groups = [p for p in chosen for _ in range(M)], np.repeat(np.arange(P), M)
        x0, r, acc, grad = (ddpo_round(args, ft, opt, abar, prompts, tracker, gen) if args.algo == "ddpo"
                            else graft_round(args, ref, ft, opt, abar, prompts, groups, gen))
        ok, wall = world_checker(x0, prompts), time.time() - t0
        add = dict(samples=P * M, nfe_sampling=P * M * nfe_per_image(args), grad_calls=grad, wall_s=wall)
        compute = {k: compute[k] + v for k, v in add.items()}
        rounds.append(dict(round=rnd + 1, mean_reward=float(r.mean()), checker=ok,
                           accepted_mean_reward=float(r[acc].mean()), accepted=len(acc),
                           samples_per_s=P * M / wall, round_wall_s=wall, **compute))
        if distributed.is_main():                                 # under torchrun, rank 0 writes
            common.save_checkpoint(path, {"model": trained.state_dict(), "opt": opt.state_dict()},
                                   {"resume_key": key, "model": ref_cfg},
                                   {"rounds": rounds, "compute": compute, "buffers": tracker.buffers})
            common.write_json(os.path.join(args.out, "metrics.jsonl"), rounds, lines=True)
        print(f"round {rnd + 1}/{args.rounds}: mean reward {r.mean():.3f}, checker "
              f"{float('nan') if ok is None else ok:.3f}, accepted "
              f"{len(acc)}/{P * M} (their reward {float(r[acc].mean()):.3f}), {wall:.0f} s", flush=True)
    return ft, rounds, compute


# -- pre-training the reference model (resumable, pretraining.py) and its export -----------------------------

def pretrain(args, device):
    """eps-prediction DDPM training on scenes rendered on the fly from the training prompts
    (category-balanced, seeded by the step's generator), prompt dropout p_uncond, AdamW with warm-up, EMA
    weights; resumable from <out>/ref.pt, then exported."""
    cfg, path = model_config(args), os.path.join(args.out, "ref.pt")
    model, ema = build_model(cfg).to(device), build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    abar, pools = make_abar(cfg).to(device), {c: v["train"] for c, v in split_prompts().items()}
    print(f"pre-training {sum(q.numel() for q in model.parameters()):,} parameters, batch {args.batch_size}, "
          f"lr {args.lr}, to step {args.train_steps}")

    def batches(step, gen):
        while True:
            rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=gen)))
            prompts = draw_prompts(pools, args.batch_size, rng)
            yield render_prompts(prompts, rng, cfg["image_size"]).to(device), tokenize(prompts).to(device)

    config = {"model": cfg, "command": "python graft_t2i.py " + " ".join(sys.argv[1:]),
              "p_uncond": args.p_uncond}
    step = pretraining.train_resumable(path, config, model, ema, opt, batches,
                                       lambda net, b, gen: shaped_loss(net, *b, abar, 1, cfg["T"], 1.0, gen,
                                                                       args.p_uncond),
                                       args.train_steps, args, device, "pre-training",
                                       pretraining.same_model(cfg, path, "graft_t2i"),
                                       lr_at=lambda s: args.lr * min(1.0, (s + 1) / 1000))
    print(f"saved {path} at step {step}")
    export(path, args.export_to)


def export(path, dest):
    try:
        pretraining.export_ema(path, dest)
    except common.CheckpointError as e:
        raise SystemExit(f"graft_t2i: {e}")


# -- evaluation on held-out prompts: reward, judge, checker (GenEval's analogue), diversity ------------------

def evaluate_sampler(hi, lo, N_I, args, abar, prompts, desc):
    """n_eval images from the same seeds for every model (common random numbers), scored three ways."""
    t0, gen = time.time(), torch.Generator().manual_seed(args.seed + 12_345)
    res = sample(hi, lo, prompts, abar, args.N, N_I, args.eta, args.guidance, args.sample_batch, gen, args.amp,
                 reward_fn(args))
    wall, x0, r = time.time() - t0, res["x0"], res["r"].numpy()                  # x0 (n_eval, 3, H, W)
    world = all(map(in_grammar, prompts))                                          # the world's prompts
    judge_fn = get_judge(args.device) if world else None
    judge = score(x0, prompts, judge_fn, "judge").numpy() if judge_fn else None
    print(f"{desc}: {len(prompts)} images in {wall:.0f} s" + ("" if judge is not None else " (no judge: "
          f"{VQA.format('judge')} is missing)"), flush=True)
    return {"n_samples": len(prompts), "nfe": len(prompts) * nfe_per_image(args), "wall_s": wall,
            "samples_per_s": len(prompts) / wall,
            "metrics": metrics(to_world(x0), prompts, r, judge) if world else {   # SD2's prompts: no checker
                "reward": common.mean_ci95(r), "judge": None, "checker": None, "per_category": {},
                "diversity": common.mean_ci95(diversity(x0, prompts))}}, to_uint8(x0)


def reference_eval(args, ref, abar, prompts):
    """The reference's evaluation, cached by (checkpoint bytes, sampler, prompts, seed, reward, the VQA
    networks' bytes): every run of a sweep compares against the same numbers."""
    scorers = [common.sha1_file(VQA.format(w)) for w in ("reward", "judge") if os.path.isfile(VQA.format(w))]
    weights = (args.repo, args.revision) if args.sd2 else common.sha1_file(common.resolve_ref(args.ref))
    tag = hashlib.sha1(repr((weights, args.N, args.eta, args.guidance,
                             args.seed, args.reward, prompts, scorers)).encode()).hexdigest()[:16]
    path = os.path.join("runs", "t2i_reference_evals", tag)
    have = distributed.broadcast(os.path.exists(path + ".json"))    # rank 0 decides: all read, or all sample

    def compute():
        ev, im = evaluate_sampler(ref, ref, 0, args, abar, prompts, "reference eval")
        return ev, {"images": im}
    return common.cached(path, compute) if have or distributed.is_main() else compute()


def plot_rounds(out, rounds, reference, reward):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x, m = [0] + [r["round"] for r in rounds], reference["metrics"]
    ax.plot(x, [np.nan] + [r["mean_reward"] for r in rounds], "o-", label=f"{reward} reward (train prompts)")
    if m["checker"]:                                                         # the world's prompts only
        ax.plot(x, [np.nan] + [r["checker"] for r in rounds], "s--", label="checker accuracy (training prompts)")
        ax.plot([0], [m["checker"]["mean"]], "k*", label="reference checker (held-out)")
    ax.set_xticks(x), ax.set_xlabel("round (0 = reference)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rounds.png"), dpi=120), plt.close(fig)


def measure_variance(args, ref, abar, pools):
    """docs/method.md §3: E[Var(r(X_0) | X_t)] at t = tau_{N_I} for a grid of n_i: var_P reference
    trajectories (training prompts) stopped at each grid step, var_R continuations each at --eta (0 makes
    it vanish)."""
    grid = sorted({round(f * args.N) for f in (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}, reverse=True)
    gen, reward = torch.Generator().manual_seed(args.seed), get_reward(args.reward, args.device)
    prompts = draw_prompts(pools, args.var_P, np.random.default_rng(args.seed))
    x, k_prev, states = torch.randn(args.var_P, *ref.latent_shape, generator=gen), args.N, {}
    ids = ref.tokenize(prompts)
    for k in grid:
        with torch.no_grad():
            x = ddim_steps(ref, x, ids, abar, args.N, k_prev, k, args.eta, args.guidance, gen, args.amp)
        states[k], k_prev = x, k
    curve, rep = [], [p for p in prompts for _ in range(args.var_R)]
    for k in grid[::-1]:
        x0 = continue_from(ref, states[k].repeat_interleave(args.var_R, 0), rep, abar, args.N, k, args.eta,
                           args.guidance, args.sample_batch, gen, args.amp)
        r = score(x0, rep, reward).view(args.var_P, args.var_R)
        within = r.var(1, unbiased=True)                                          # (P,)
        curve.append({"n_i": k / args.N, "N_I": k, "t": int(common.time_grid(args.T, args.N)[k]),
                      "cond_var": common.mean_ci95(within.numpy()), "total_var": float(r.flatten().var())})
        print(f"n_i {k / args.N:.2f}: E[Var(r|x_t)] = {within.mean():.4f} (total Var(r) {r.var():.4f})")
    if distributed.is_main():
        common.write_json(os.path.join(args.out, "variance.json"),
                          dict(reward=args.reward, P=args.var_P, R=args.var_R, eta=args.eta, curve=curve))
    return curve


# -- main ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.seed_everything(args.seed)
    device = distributed.init(common.get_device(args.device))               # torchrun: one process per rank
    if args.pretrain or args.export:
        args.out = args.out or os.path.join("runs", f"t2i_pretrain_{args.preset}")
        return pretrain(args, device) if args.pretrain else export(f"{args.out}/ref.pt", args.export_to)
    method = "reference" if args.eval_only else "variance" if args.measure_variance else method_name(args)
    args.out = args.out or os.path.join("runs", f"t2i_{method}" + (f"_ni{args.n_i}" if args.N_I else ""))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"graft_t2i: --out {args.out!r} is a file, not a folder")
    pools, prompts = finetune_pools(args), eval_prompts(args)                 # bad prompt files fail here
    get_reward(args.reward, args.device), get_judge(args.device)            # so does a bad scorer, before work
    ref, ref_cfg = load_sd2(args, device) if args.sd2 else load_reference(args.ref, device)
    args.image_size = ref_cfg["image_size"]                                 # the checkpoint's, not the flag's
    os.makedirs(args.out, exist_ok=True)
    abar, ref = make_abar(ref_cfg, ref), common.maybe_compile(ref, args.compile)
    print(f"reference: {args.repo if args.sd2 else args.ref} ({sum(q.numel() for q in ref.parameters()):,} "
          f"parameters), {args.image_size} px, NFE per image {nfe_per_image(args)}")
    if args.measure_variance:
        return measure_variance(args, ref, abar, pools)
    if not args.eval_only:
        print(f"{method}: {args.prompts_per_round} prompts x M {args.M}, "
              + ("all on-policy" if args.algo == "ddpo" else f"Top-{args.K} each") + f", {args.rounds} "
              f"rounds, N {args.N}, eta {args.eta}, w {args.guidance}, N_I {args.N_I}, reward {args.reward}")
    t0 = time.time()
    reference, ref_images = reference_eval(args, ref, abar, prompts)
    results = {"task": "t2i", "method": method, "n_i": args.n_i,
               "command": "python graft_t2i.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "config": dict(vars(args)) | {"model": ref_cfg, "hardware": pretraining.hardware()},
               "reference": reference}
    ft_images = None
    if not args.eval_only:
        ft, rounds, compute = finetune(args, ref, ref_cfg, abar, pools, device)          # Alg. 1 / 2 rounds
        finetuned, ft_images = evaluate_sampler(*samplers(args, ref, ft), args, abar, prompts, "fine-tuned")
        results |= {"finetuned": finetuned, "compute": compute, "rounds": rounds}
    results["wall_s"] = time.time() - t0
    if not distributed.is_main():                                 # under torchrun, rank 0 writes and reports
        return results
    if not args.eval_only:
        plot_rounds(args.out, rounds, reference, args.reward)
    save_grid(os.path.join(args.out, "grid.png"), ref_images["images"], ft_images, prompts,
              per_cat=8 if args.sd2 else 2, scale=max(1, 128 // ref_images["images"].shape[1]))
    common.write_json(os.path.join(args.out, "results.json"), results)
    for name in ("reference", "finetuned"):
        if name in results:
            m = results[name]["metrics"]
            judge, ok = (m[k]["mean"] if m[k] else float("nan") for k in ("judge", "checker"))
            print(f"{name:>10}: reward {m['reward']['mean']:.3f}, judge {judge:.3f}, checker {ok:.3f} ("
                  + ", ".join(f"{c} {v['checker']['mean']:.2f}" for c, v in m["per_category"].items())
                  + f"), diversity {m['diversity']['mean']:.3f}")
    print(f"wrote {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
