"""common.py — the few pieces every graft script shares verbatim.

Noise schedules, EMA, the GRAFT acceptance rules (SPEC 2), checkpoints (local path or `hf:org/repo/file`),
seeding, device / AMP / torch.compile helpers, confidence intervals and atomic JSON output.
Nothing task-specific lives here.
"""
import contextlib
import json
import math
import os
import random
import tempfile

import numpy as np
import torch


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


# -- EMA -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers alike."""
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
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


def accept(rewards, rule, K=None, tau=None, keys=None):
    """One call for every rule: 'top_k' (Top-K of M), 'best_of_n' (K = 1), 'threshold' (r >= tau).
    With `keys`, duplicates are removed first and the rule ranks the survivors. Returns indices into rewards."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    pool = dedup_first(keys) if keys is not None else torch.arange(len(rewards))
    r = rewards[pool]
    if rule == "top_k":
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


def save_checkpoint(path, state_dicts, config, extra=None):
    """Atomically write {'config': JSON-able dict, 'state_dicts': {name: state_dict}, 'extra': JSON-able}."""
    json.dumps(config), json.dumps(extra)  # fail here, not at load time, if something is not JSON-able
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


def write_json(path, obj):
    """Atomic JSON write, so a crash never leaves half a results.json."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
