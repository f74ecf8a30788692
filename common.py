"""common.py — the few pieces every graft script shares verbatim.

Noise schedules, EMA, the GRAFT acceptance rules (SPEC 2), checkpoints (local path or `hf:org/repo/file`),
seeding, device / AMP / torch.compile helpers, confidence intervals and atomic JSON output.
Nothing task-specific lives here.
"""
import collections
import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm


# -- noise schedules: abar[t] for t = 0..T (abar[0] ~ 1 is data, abar[T] ~ 0 is noise) ---------------------

def _clip_alpha_steps(abar, clip_value=0.001):
    """EDM's clip_noise_schedule: bound abar_t / abar_{t-1} from below so no single step destroys the signal."""
    abar = np.concatenate([np.ones(1), abar])
    steps = np.clip(abar[1:] / abar[:-1], clip_value, 1.0)
    return np.cumprod(steps)


def noise_schedule(name, T, precision=1e-5):
    """abar (T+1,) float64. 'polynomial_2' is EDM's (Hoogeboom et al. 2022, eq. 17), 'linear' and 'cosine' are
    DDPM's (Ho et al. 2020) and improved-DDPM's (Nichol & Dhariwal 2021)."""
    if name.startswith("polynomial_"):
        power = float(name.split("_")[1])
        x = np.linspace(0, T + 1, T + 1)
        abar = _clip_alpha_steps((1 - (x / (T + 1)) ** power) ** 2)
        return (1 - 2 * precision) * abar + precision
    if name == "linear":
        betas = np.linspace(1e-4, 0.02, T)
        return np.concatenate([[1.0], np.cumprod(1 - betas)])
    if name == "cosine":
        s = 0.008
        x = np.linspace(0, T, T + 1)
        f = np.cos((x / T + s) / (1 + s) * math.pi / 2) ** 2
        return np.clip(f / f[0], 1e-5, 1.0)
    raise ValueError(f"unknown noise schedule {name!r} (polynomial_2, linear, cosine)")


# -- diffusion pieces every DDPM script shares (SPEC 1, 3, 4) ----------------------------------------------------

def time_grid(T, N):
    """tau_0 = 0 < tau_1 < ... < tau_N = T: the sampler's N steps, evenly spaced integers of the T-step schedule."""
    return torch.round(torch.linspace(0, T, N + 1)).long()


def gaussian_noise(shape, mask, gen=None):
    """N(0, I) on the real elements (mask (B, n) bool), zero on padding. Drawn on the CPU, so a seed gives the
    same draws on any device."""
    return torch.randn(shape, generator=gen).to(mask.device) * mask[..., None]


def shaped_loss(net, z_s, mask, abar, t_lo, t_hi, abar_s=1.0, gen=None, noise=gaussian_noise):
    """SPEC 3, P-GRAFT's loss: train eps_theta only for t in [t_lo, t_hi] on data z_s that lives at time s.
        x_t = sqrt(abar_t/abar_s) x_s + sqrt(1 - abar_t/abar_s) eps',  loss = |eps_theta(x_t, t)/c_t - eps'|^2,
        c_t = sqrt((1 - abar_t) / (1 - abar_t/abar_s)).
    Why c_t: the shaped marginal at t > s has score -E[eps'|x_t] / sqrt(1 - abar_t/abar_s), and an eps-model must
    output -sqrt(1 - abar_t) score; so the reference's parameterisation, sampler and weights all still serve.
    abar_s = 1 (x_s = x_0) gives c_t = 1: the ordinary DDPM loss of pre-training and GRAFT.
    z_s (B, n, D), mask (B, n); the error is averaged over the real dimensions of each sample."""
    B, abar = z_s.shape[0], abar.to(z_s.device)
    t = torch.randint(t_lo, t_hi + 1, (B,), generator=gen).to(z_s.device)
    ratio = (abar[t] / abar_s).view(B, 1, 1)                                    # abar_t / abar_s
    eps = noise(z_s.shape, mask, gen)                                            # eps' (B, n, D)
    z_t = ratio.sqrt() * z_s + (1 - ratio).sqrt() * eps
    c_t = ((1 - abar[t].view(B, 1, 1)) / (1 - ratio)).sqrt()
    err = ((net(z_t, t.float() / (len(abar) - 1), mask) / c_t - eps) ** 2) * mask[..., None]
    return (err.sum((1, 2)) / (mask.sum(1) * z_s.shape[-1])).mean()


def gaussian_logp(z, mean, std, mask):
    """log N(z; mean, std^2) averaged over the real dimensions (DDPO's convention, SPEC 4). -> (B,)"""
    lp = (-((z - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)) * mask[..., None]
    return lp.sum((1, 2)) / (mask.sum(1) * z.shape[-1])


def train_on_accepted(ft, opt, x_acc, n_acc, abar, t_lo, t_hi, abar_s, steps, batch, amp, noise=gaussian_noise,
                      ema_decay=0.0):
    """GRAFT / P-GRAFT training on one round's accepted states x_acc (K, n_max, D) with n_acc (K,) real elements:
    shaped_loss for t in [t_lo, t_hi]; one gradient call = one (x_t, t) pair. Returns the gradient calls.
    ema_decay > 0: the round ends on the EMA of its Adam iterates, started from the round's first weights (Polyak
    averaging). Why: a round takes many epochs over a few hundred samples, so its last raw iterate is noisy, and
    the next round samples from it (layouts, README: at K 250 layout FID x2.7 -> x2.1 for the same alignment)."""
    dev = next(ft.parameters()).device
    mask_all = torch.arange(x_acc.shape[1])[None] < torch.as_tensor(n_acc)[:, None]   # (K, n_max)
    params = list(ft.parameters())
    avg = [p.detach().clone() for p in params] if ema_decay > 0 else None
    ft.train()
    for _ in tqdm(range(steps), desc="fine-tuning", leave=False):
        idx = torch.randint(len(x_acc), (batch,))
        n = int(n_acc[idx.numpy()].max())
        with autocast(dev, amp):
            loss = shaped_loss(ft, x_acc[idx, :n].to(dev), mask_all[idx, :n].to(dev), abar, t_lo, t_hi, abar_s,
                               noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
        if avg is not None:
            torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - ema_decay)
    if avg is not None:
        with torch.no_grad():
            for p, a in zip(params, avg):
                p.copy_(a)
    ft.eval()
    return steps * batch


def ddpo_update(ft, opt, res, rewards, n_elem, abar, N, args, step_mean_std):
    """One inner epoch of PPO on sampled trajectories (SPEC 4): advantages standardised over the batch (one
    'prompt'), clipped to +-5; clipped surrogate on the per-dimension-averaged log-probs; grad clip 1.
    res["traj"] (M, N+1, n_max, D) and res["logp"] (M, N) come from the script's sampler, whose Gaussian step is
    step_mean_std(eps, z_t, abar, t, s) -> (mean, std). Returns the gradient calls."""
    dev, T, tau = next(ft.parameters()).device, len(abar) - 1, time_grid(len(abar) - 1, N)
    adv = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-5, 5)
    mask_all = torch.arange(res["traj"].shape[2])[None] < torch.as_tensor(n_elem)[:, None]
    # the last step (tau_1 -> 0) has a (near-)zero std, so its log-prob ratio is numerically explosive: skip it
    trainable = torch.arange(N - 1)
    n_steps, grad_calls, perm = max(1, round(args.ddpo_steps_frac * len(trainable))), 0, torch.randperm(len(rewards))
    ft.train()
    for b in tqdm(range(0, len(perm), args.ddpo_batch), desc="DDPO", leave=False):
        idx = perm[b:b + args.ddpo_batch]
        n = int(n_elem[idx.numpy()].max())
        mask, a = mask_all[idx, :n].to(dev), adv[idx].to(dev)
        opt.zero_grad(set_to_none=True)
        for j in trainable[torch.randperm(len(trainable))[:n_steps]].tolist():
            k = N - j                                               # the step from tau_k to tau_{k-1}
            z_t, z_s = res["traj"][idx, j, :n].to(dev), res["traj"][idx, j + 1, :n].to(dev)
            with autocast(dev, args.amp):
                eps = ft(z_t, torch.full((len(idx),), float(tau[k]) / T, device=dev), mask).float()
            mean, std = step_mean_std(eps, z_t, abar.to(dev), tau[k], tau[k - 1])
            ratio = torch.exp(gaussian_logp(z_s, mean, std, mask) - res["logp"][idx, j].to(dev))
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - args.ddpo_clip, 1 + args.ddpo_clip)).mean()
            (loss / n_steps).backward()
            grad_calls += len(idx)
        torch.nn.utils.clip_grad_norm_(ft.parameters(), 1.0)
        opt.step()
    ft.eval()
    return grad_calls


def method_name(args):
    return "ddpo" if args.algo == "ddpo" else "rpgraft" if args.rp else "pgraft" if args.N_I > 0 else "graft"


def samplers(args, ref, ft):
    """(net_hi, net_lo, N_I) of the fine-tuned sampler: who denoises above s and who below (SPEC 3).
    GRAFT and DDPO: the fine-tuned model everywhere. P-GRAFT: fine-tuned above s, reference below.
    RP-GRAFT (the paper's ablation): reference above s, fine-tuned below."""
    if args.algo == "ddpo" or args.N_I == 0:
        return ft, ft, 0
    return (ref, ft, args.N_I) if args.rp else (ft, ref, args.N_I)


def training_window(args, abar, tau):
    """(saved step, t_lo, t_hi, abar_s): which state of an accepted sample is kept and which t are trained.
    GRAFT: x_0, t in [1, T]. P-GRAFT: x_s, t in (s, T] with the shaped loss. RP-GRAFT: x_0, t in [1, s]."""
    T, s = len(abar) - 1, int(tau[args.N_I])
    if args.N_I == 0 or args.rp:
        return 0, 1, s if args.rp else T, 1.0
    return args.N_I, s + 1, T, float(abar[s])


def size_bucketed_batches(n, batch_size, gen):
    """Shuffled batches of similar-sized samples (n: (N,) element counts), so padding wastes little compute."""
    idx, batches = torch.randperm(len(n), generator=gen).numpy(), []
    for c in range(0, len(idx), batch_size * 50):
        part = idx[c:c + batch_size * 50]
        part = part[np.argsort(n[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


# -- the fine-tuning flags every DDPM script shares (same names and meaning everywhere) ------------------------

def add_finetuning_args(a, unit):
    """GRAFT / P-GRAFT / RP-GRAFT / DDPO and runtime flags (SPEC 2-4); `a` is parser.add_argument, `unit` names a
    sample ("molecules", "layouts") in the help."""
    a("--n_i", type=float, default=0.0, help="P-GRAFT switch: N_I = round(n_i N); 0 is plain GRAFT")
    a("--rp", action="store_true", help="RP-GRAFT: reference above s, fine-tuned model below (ablation)")
    a("--M", type=int, help=f"{unit} drawn per round")
    a("--K", type=int, help=f"{unit} accepted per round (Top-K of M)")
    a("--accept", choices=["top_k", "best_of_n", "threshold"], default="top_k", help="acceptance rule (SPEC 2)")
    a("--tau", type=float, help="reward threshold for --accept threshold")
    a("--no_dedup", action="store_true", help=f"keep duplicate {unit} before ranking (de-duplication is the default)")
    a("--stratify", action="store_true", help=f"Top-K within each size (the element / atom count the sampler is "
      f"given), K split in proportion: the accepted {unit} keep the size histogram instead of favouring sizes "
      f"that score well")
    a("--rounds", type=int, help="GRAFT rounds (or DDPO epochs of M samples)")
    a("--sample_from", choices=["current", "reference"], default="current",
      help="GRAFT: draw each round from the current fine-tuned model (tilts compound) or always from the "
      "reference (one tilt); DDPO always samples on-policy")
    a("--ft_steps", type=int, help="fine-tuning gradient steps per round")
    a("--ft_lr", type=float, default=1e-4, help="fine-tuning learning rate (Adam)")
    a("--ft_ema", type=float, help="GRAFT: each round keeps the EMA of its fine-tuning iterates with this decay "
      "(0 keeps the last iterate; DDPO always keeps it)")
    a("--ddpo_lr", type=float, default=1e-5, help="DDPO learning rate (full fine-tuning, lower than LoRA's 3e-4)")
    a("--ddpo_batch", type=int, default=50, help="trajectories per DDPO gradient step")
    a("--ddpo_steps_frac", type=float, default=0.1, help="fraction of sampler steps trained per trajectory")
    a("--ddpo_clip", type=float, default=1e-4, help="PPO clip range (tiny, for per-dimension-averaged log-probs)")
    a("--var_R", type=int, default=8, help="continuations per intermediate state for --measure_variance")
    a("--var_P", type=int, default=64, help="intermediate states per n_i for --measure_variance")
    add_runtime_args(a)


# the settings a fine-tuning run's state.pt must share with the command that resumes it
RESUME_KEYS = ("algo", "n_i", "rp", "M", "K", "accept", "tau", "dedup", "stratify", "sample_from", "ft_steps",
               "ft_lr", "ft_ema", "reward", "N", "T", "seed", "batch_size", "ddpo_lr", "ddpo_batch", "ddpo_steps_frac", "ddpo_clip")


def plan(method, args, tau, T):
    """The derived quantities of a fine-tuning run, printed at its start: acceptance, switch step, compute per round."""
    grad = (args.M * max(1, round(args.ddpo_steps_frac * (args.N - 1))) if args.algo == "ddpo"
            else args.ft_steps * args.batch_size)
    rule = {"top_k": f"Top-{args.K} of M {args.M} (K/M {args.K / args.M:.2f})", "best_of_n": f"Best-of-{args.M}",
            "threshold": f"r >= {args.tau} of M {args.M}"}[args.accept]
    accept = ("on-policy policy gradient" if args.algo == "ddpo"
              else f"{rule}, dedup {args.dedup}, EMA of each round's iterates {args.ft_ema}")
    return (f"{method}: {accept}, rounds {args.rounds}, N {args.N}, N_I {args.N_I}, s = tau_N_I = "
            f"{int(tau[args.N_I])}/{T}, reward {args.reward}; per round: NFE {args.M * (args.N + 1):,}, "
            f"gradient calls {grad:,}")


def add_runtime_args(a, amp_help="bf16 autocast (GPU)"):
    a("--seed", type=int, default=0, help="seed: a CPU run is reproducible")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    a("--amp", action="store_true", help=amp_help)
    a("--compile", action="store_true", help="torch.compile the network")


def parse_with_presets(p, argv, presets):
    """argparse, then every flag left unset (None) takes the chosen --preset's value."""
    args = p.parse_args(argv)
    for k, v in presets[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def check_finetuning_args(p, args, rewards, positive=()):
    """One-line parser errors (exit 2) for bad values; adds the derived N_I and dedup."""
    if not 0 <= args.n_i < 1:
        p.error(f"--n_i must be in [0, 1), got {args.n_i}")
    if args.rp and args.n_i == 0:
        p.error("--rp needs --n_i > 0 (with n_i = 0 the reference would do every step)")
    for k in ("M", "K", "N", "T", "rounds", "n_eval", "batch_size", "sample_batch", "var_R", "var_P", *positive):
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}")
    if min(args.ft_steps, args.train_steps) < 0:
        p.error("--ft_steps and --train_steps must be >= 0")
    if not 0 <= args.ft_ema < 1:
        p.error(f"--ft_ema must be in [0, 1), got {args.ft_ema}")
    if args.K > args.M or args.N > args.T:
        p.error(f"need --K <= --M and --N <= --T, got K {args.K}, M {args.M}, N {args.N}, T {args.T}")
    if args.reward not in rewards:
        p.error(f"unknown --reward {args.reward!r}; choose from {', '.join(rewards)}")
    if args.stratify and args.accept != "top_k":
        p.error("--stratify works with --accept top_k only")
    if args.accept == "threshold" and args.tau is None:
        p.error("--accept threshold needs --tau")
    if not 0 < args.ddpo_steps_frac <= 1:
        p.error("--ddpo_steps_frac must be in (0, 1]")
    args.N_I = round(args.n_i * args.N)
    args.dedup = not args.no_dedup


# -- the resumable training loop every script's pre-training shares ---------------------------------------------

def train_resumable(path, config, model, ema, opt, batches, loss_fn, total_steps, args, device, desc, refuse,
                    lr_at=None):
    """Adam-family steps on loss_fn(net, batch, gen), grad clip 1, EMA weights for sampling; resumes model, EMA,
    optimizer, step and wall time from `path` (refuse(saved_config) returns an error line for a run that does not
    fit); saves atomically every 5 minutes, at the end, and when --max_minutes runs out. batches(step, gen)
    yields batches from `step` on; gen is seeded by --seed and the step, so a resumed run reshuffles from where it
    stands. The learning rate is lr_at(step), else --lr, also on resume (the optimizer state would restore the old
    one). Returns the step reached."""
    step, wall, lr_at = 0, 0.0, lr_at or (lambda step: args.lr)
    ema.load_state_dict(model.state_dict())
    if os.path.exists(path):
        ckpt = load_checkpoint(path)
        if refuse(ckpt["config"]):
            raise SystemExit(refuse(ckpt["config"]))
        for k, m in (("model", model), ("ema", ema), ("opt", opt)):
            m.load_state_dict(ckpt["state_dicts"][k])
        step, wall = ckpt["extra"]["step"], ckpt["extra"]["wall_s"]
        print(f"resuming {desc} at step {step} ({wall / 3600:.2f} h so far)")
    net = maybe_compile(model, args.compile)
    gen = torch.Generator().manual_seed(args.seed + step)
    t_start, wall0, last_save = time.time(), wall, time.time()
    losses = collections.deque(maxlen=100)  # on the device: reading a loss every step would stall a GPU
    mean_loss = lambda: float(torch.stack(list(losses)).mean()) if losses else None

    def save():
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}, config,
                        {"step": step, "wall_s": wall, "finished": step >= total_steps,
                         "loss_last_100": mean_loss(),
                         "hardware": f"{device.type}, {torch.get_num_threads()} threads"})

    bar = tqdm(total=total_steps, initial=step, desc=desc)
    for batch in ([] if step >= total_steps else batches(step, gen)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast(device, args.amp):
            loss = loss_fn(net, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, args.ema_decay)
        step += 1
        losses.append(loss.detach())
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{mean_loss():.4f}")
        now = time.time()
        wall = wall0 + now - t_start
        done = step >= total_steps or (args.max_minutes is not None and now - t_start > 60 * args.max_minutes)
        if done or now - last_save > 300:
            save()
            last_save = now
        if done:
            break
    if step == 0 and not os.path.exists(path):
        save()
    bar.close()
    return step


# -- EMA -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers alike."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


# -- GRAFT acceptance rules (SPEC 2) -------------------------------------------------------------------------

def accept_top_k(rewards, K):
    """Indices of the K largest rewards (Top-K of M; K = 1 is Best-of-N). Ties broken by index, deterministic."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    order = torch.argsort(-rewards, stable=True)
    return order[:K]


def accept_threshold(rewards, tau):
    """Indices with r >= tau."""
    return torch.nonzero(torch.as_tensor(rewards) >= tau).flatten()


def dedup_first(keys):
    """Indices of the first occurrence of every distinct key (None keys are dropped: they have no identity,
    e.g. an invalid molecule). Applied before ranking, it adds -log(#copies) to the reshaped reward (SPEC 2)."""
    seen, keep = set(), []
    for i, k in enumerate(keys):
        if k is not None and k not in seen:
            seen.add(k)
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def stratum_quotas(groups, K):
    """K split over strata in proportion to their sizes (largest remainders, so the quotas sum to K): the accepted
    set keeps the sampled histogram of the stratifying condition. Returns {stratum: quota}."""
    values, counts = np.unique(np.asarray(groups), return_counts=True)
    share = K * counts / counts.sum()
    quota = np.floor(share).astype(int)
    for i in np.argsort(-(share - quota), kind="stable")[: K - quota.sum()]:
        quota[i] += 1
    return dict(zip(values.tolist(), quota.tolist()))


def accept(rewards, rule, K=None, tau=None, keys=None, groups=None):
    """One call for every rule: 'top_k' (Top-K of M), 'best_of_n' (K = 1), 'threshold' (r >= tau).
    With `keys`, duplicates are removed first and the rule ranks the survivors. With `groups` (top_k only), Top-K
    runs within each stratum with K split by stratum_quotas: the Top-K of each condition the sampler was given
    (the element or atom count), as the paper's text-to-image Top-K is per prompt. Returns indices into rewards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    pool = dedup_first(keys) if keys is not None else torch.arange(len(rewards))
    r = rewards[pool]
    if rule == "top_k" and groups is not None:
        in_pool = np.asarray(groups)[pool.numpy()]
        sel = []
        for g, k in stratum_quotas(groups, K).items():
            ids = torch.as_tensor(np.nonzero(in_pool == g)[0], dtype=torch.long)
            sel.append(ids[accept_top_k(r[ids], min(k, len(ids)))])
        sel = torch.cat(sel).sort().values
    elif rule == "top_k":
        sel = accept_top_k(r, min(K, len(pool)))
    elif rule == "best_of_n":
        sel = accept_top_k(r, min(1, len(pool)))
    elif rule == "threshold":
        sel = accept_threshold(r, tau)
    else:
        raise ValueError(f"unknown acceptance rule {rule!r}")
    return pool[sel]


# -- checkpoints ---------------------------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not fit; scripts turn it into one error line."""


def _to_cpu(v):
    """Every tensor in nested dicts / lists / tuples (optimizer states nest them) moved to the CPU."""
    if torch.is_tensor(v):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return type(v)(_to_cpu(x) for x in v) if isinstance(v, (list, tuple)) else v


def save_checkpoint(path, state_dicts, config, extra=None):
    """Atomically write {'config': JSON-able dict, 'state_dicts': {name: state_dict}, 'extra': JSON-able}.
    Tensors are stored on the CPU, so a checkpoint trained on a GPU loads anywhere with a plain torch.load."""
    json.dumps(config), json.dumps(extra)  # fail here, not at load time, if something is not JSON-able
    state_dicts = _to_cpu(state_dicts)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"config": config, "state_dicts": state_dicts, "extra": extra}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_ref(ref):
    """A local path, or `hf:org/repo/path/in/repo` fetched (and cached) with huggingface_hub."""
    if ref.startswith("hf:"):
        parts = ref[3:].split("/")
        if len(parts) < 3:
            raise CheckpointError(f"{ref!r} is not of the form hf:org/repo/file")
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
        except Exception as e:  # offline, missing repo or file: all the user can act on is the message
            raise CheckpointError(f"could not fetch {ref} from the Hugging Face Hub ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not os.path.isfile(ref):
        raise CheckpointError(f"checkpoint {ref!r} does not exist")
    return ref


def load_checkpoint(ref, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint (or a bare state_dict) with weights_only=True."""
    path = resolve_ref(ref)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{ref!r} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{ref!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if "state_dicts" not in ckpt:  # a bare state_dict, e.g. a released model
        ckpt = {"config": {}, "state_dicts": {"model": ckpt}, "extra": None}
    if not isinstance(ckpt.get("config") or {}, dict) or not isinstance(ckpt["state_dicts"], dict):
        raise CheckpointError(f"{ref!r} is not a checkpoint of this project (config or weights malformed)")
    ckpt["config"] = ckpt.get("config") or {}
    return ckpt


def load_state(module, state_dict, what):
    """load_state_dict(strict=True) with a one-line explanation instead of a page of key names."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{what} does not fit this model's architecture ({first[:200]}); "
                              f"pass the size flags it was trained with") from None


# -- seeding, devices, AMP, compile --------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(device, enabled):
    """bf16 autocast where asked for (opt-in --amp); a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def maybe_compile(module, enabled):
    """Opt-in torch.compile, in place: the module keeps its identity and its state_dict keys."""
    if enabled:
        module.compile(dynamic=True)
    return module


# -- statistics and output -----------------------------------------------------------------------------------

def mean_ci95(values):
    """{'mean', 'ci95'}: Wilson interval for 0/1 data, normal interval on the mean otherwise."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    m = float(x.mean())
    if np.all((x == 0) | (x == 1)):
        z = 1.959964
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return {"mean": m, "ci95": [min(centre - half, m), max(centre + half, m)]}  # rounding at m = 0 or 1
    half = 1.959964 * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": m, "ci95": [m - half, m + half]}


def frechet_distance(mu1, s1, mu2, s2, eps=1e-6):
    """SPEC 6: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}); scipy's sqrtm, a tiny imaginary part dropped, eps I
    added to both when the product is singular (pytorch-fid's recipe)."""
    from scipy import linalg
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:                  # scipy warns on a singular product
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if any(issubclass(w.category, linalg.LinAlgWarning) for w in caught) or not np.isfinite(covmean).all():
            off = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def write_json(path, obj):
    """Atomic JSON write, so a crash never leaves half a results.json."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_jsonl(path, rows):
    """Rewrite a JSON-lines file atomically (metrics.jsonl: one line per finished round)."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def sha1_file(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
