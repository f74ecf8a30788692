"""common.py — what every graft script shares verbatim: schedules and time grids, EMA, checkpoints (a path or
`hf:org/repo/file`), seed / device / AMP / compile, confidence intervals, the Frechet distance, JSON output.
No algorithm, flags or validators: those live in each task script (the acceptance rules in acceptance.py)."""
import contextlib
import hashlib
import json
import math
import os
import random
import warnings

import numpy as np
import torch


# -- noise schedules: abar[t] for t = 0..T (abar[0] ~ 1 is data, abar[T] ~ 0 is noise), docs/method.md §1 ----

def noise_schedule(name, T, precision=1e-5):
    """abar (T+1,) float64. 'polynomial_2' is EDM's (Hoogeboom et al. 2022, eq. 17, with its clip of
    abar_t / abar_{t-1} at 0.001), 'linear' and 'cosine' are DDPM's and improved-DDPM's."""
    if name.startswith("polynomial_"):
        x = np.linspace(0, T + 1, T + 1)
        abar = np.concatenate([np.ones(1), (1 - (x / (T + 1)) ** float(name.split("_")[1])) ** 2])
        abar = np.cumprod(np.clip(abar[1:] / abar[:-1], 0.001, 1.0))
        return (1 - 2 * precision) * abar + precision
    if name == "linear":
        return np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, T))])
    if name == "cosine":
        f = np.cos((np.linspace(0, T, T + 1) / T + 0.008) / 1.008 * math.pi / 2) ** 2     # s = 0.008
        return np.clip(f / f[0], 1e-5, 1.0)
    raise ValueError(f"unknown noise schedule {name!r} (polynomial_2, linear, cosine)")


def time_grid(T, N):
    """tau_0 = 0 < tau_1 < ... < tau_N = T: the sampler's N steps, evenly spaced integers of 0..T."""
    return torch.round(torch.linspace(0, T, N + 1)).long()


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers alike."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


# -- checkpoints: {'config': JSON-able, 'state_dicts': {name: state_dict}, 'extra': JSON-able} ---------------

class CheckpointError(Exception):
    """A checkpoint that is missing, corrupt or does not fit; scripts turn it into one error line."""


def _to_cpu(v):                          # every tensor of nested dicts / lists (optimizer states) to the CPU
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v.cpu() if torch.is_tensor(v) else type(v)(map(_to_cpu, v)) if isinstance(v, (list, tuple)) else v


def save_checkpoint(path, state_dicts, config, extra=None):
    """Atomic write, tensors on the CPU (a GPU-trained checkpoint loads anywhere with a plain torch.load)."""
    json.dumps(config), json.dumps(extra)  # fail here, not at load time, if something is not JSON-able
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"                                   # same folder: os.replace is atomic
    try:
        torch.save({"config": config, "state_dicts": _to_cpu(state_dicts), "extra": extra}, tmp)
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
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def get_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(device, enabled):
    """bf16 autocast where asked for (opt-in --amp); a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def maybe_compile(module, enabled):
    """Opt-in torch.compile, in place: the module keeps its identity and its state_dict keys."""
    if enabled:
        module.compile(dynamic=True)
    return module


# -- statistics and output -----------------------------------------------------------------------------------

def mean_ci95(values):
    """{'mean', 'ci95'}: Wilson interval for 0/1 data, normal interval on the mean otherwise."""
    x = np.asarray(values, dtype=np.float64)
    n, z = len(x), 1.959964
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    m = float(x.mean())
    if np.all((x == 0) | (x == 1)):
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return {"mean": m, "ci95": [min(centre - half, m), max(centre + half, m)]}  # rounding at m = 0 or 1
    half = z * float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": m, "ci95": [m - half, m + half]}


def frechet_distance(mu1, s1, mu2, s2, eps=1e-6):
    """docs/method.md §6: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}); scipy's sqrtm, a tiny imaginary part
    dropped, eps I added to both when the product is singular (pytorch-fid's recipe)."""
    from scipy import linalg
    with warnings.catch_warnings(record=True) as caught:                  # scipy warns on a singular product
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if (any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
                or not np.isfinite(covmean).all()):
            covmean = linalg.sqrtm((s1 + np.eye(len(s1)) * eps) @ (s2 + np.eye(len(s1)) * eps))
    covmean, diff = covmean.real if np.iscomplexobj(covmean) else covmean, mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def write_json(path, obj, lines=False):
    """Atomic JSON write, so a crash never leaves half a results.json; lines=True writes one JSON line per
    item of obj (metrics.jsonl: one line per finished round)."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in obj) if lines else json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def cached(path, compute):
    """(JSON-able result, {name: array}) read from path.json / path.npz, or compute()d and written there
    atomically: a sweep's runs share one reference evaluation without paying for it again."""
    if os.path.exists(path + ".json"):
        with open(path + ".json") as f, np.load(path + ".npz") as z:
            return json.load(f), dict(z)
    result, arrays = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path + ".npz")
    write_json(path + ".json", result)
    return result, arrays


def sha1_file(path):
    """The first 12 hex digits of a file's sha1 (cache keys name the checkpoint they evaluate)."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
