"""pretraining.py — the resumable pre-training loop the graft scripts share (not the paper's algorithm: it
makes the reference models the paper starts from), and the size-bucketed batches of the set-valued data."""
import collections
import os
import platform
import time

import numpy as np
import torch
from tqdm import tqdm

import common


def size_bucketed_batches(n, batch_size, gen):
    """Shuffled batches of similar-sized samples (n: (N,) element counts),
    so padding wastes little compute."""
    idx, batches = torch.randperm(len(n), generator=gen).numpy(), []
    for c in range(0, len(idx), batch_size * 50):
        part = idx[c:c + batch_size * 50]
        part = part[np.argsort(n[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def set_batches(n, batch_size, make, device):
    """batches(step, gen) for train_resumable over a set-valued dataset with element counts n (N,): endless
    size-bucketed epochs, make(idx) -> (z, mask) on the CPU, moved to the device."""
    def batches(step, gen):
        while True:
            for idx in size_bucketed_batches(n, batch_size, gen):
                yield tuple(x.to(device) for x in make(idx))
    return batches


def same_model(cfg, path, who):
    """refuse() for train_resumable: a run saved at `path` must have been trained
    with the model config cfg."""
    return lambda saved: None if saved.get("model") == cfg else (
        f"{who}: {path} was trained with {saved.get('model')}, not {cfg}; "
        "use another --out or the same size flags")


def train_resumable(path, config, model, ema, opt, batches, loss_fn, total_steps, args, device, desc, refuse,
                    lr_at=None):
    """Adam-family steps on loss_fn(net, batch, gen), grad clip 1, EMA weights for sampling; resumes model,
    EMA, optimizer, step and wall time from `path` (refuse(saved_config) returns an error line for a run that
    does not fit); saves atomically every 5 minutes, at the end, and when --max_minutes runs out.
    batches(step, gen) yields batches from `step` on; gen is seeded by --seed and the step, so a resumed run
    reshuffles from where it stands. The learning rate is lr_at(step), else --lr, also on resume (the
    optimizer state would restore the old one). Returns the step reached."""
    step, wall, lr_at = 0, 0.0, lr_at or (lambda step: args.lr)
    ema.load_state_dict(model.state_dict())
    if os.path.exists(path):
        ckpt = common.load_checkpoint(path)
        if refuse(ckpt["config"]):
            raise SystemExit(refuse(ckpt["config"]))
        for k, m in (("model", model), ("ema", ema), ("opt", opt)):
            m.load_state_dict(ckpt["state_dicts"][k])
        step, wall = ckpt["extra"]["step"], ckpt["extra"]["wall_s"]
        print(f"resuming {desc} at step {step} ({wall / 3600:.2f} h so far)")
    net = common.maybe_compile(model, args.compile)
    gen = torch.Generator().manual_seed(args.seed + step)
    t_start, wall0, last_save = time.time(), wall, time.time()
    losses = collections.deque(maxlen=100)  # on the device: reading a loss every step would stall a GPU
    mean_loss = lambda: float(torch.stack(list(losses)).mean()) if losses else None

    def save():
        common.save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                      "opt": opt.state_dict()},
                               config, {"step": step, "wall_s": wall, "finished": step >= total_steps,
                                        "loss_last_100": mean_loss(),
                                        "hardware": f"{device.type}, {torch.get_num_threads()} threads"})

    bar = tqdm(total=total_steps, initial=step, desc=desc)
    for batch in ([] if step >= total_steps else batches(step, gen)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with common.autocast(device, args.amp):
            loss = loss_fn(net, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        common.ema_update(ema, model, args.ema_decay)
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


def hardware():
    """The machine, for a checkpoint's or a results.json's record of where it was made."""
    return (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads")


def export_ema(path, dest):
    """The EMA weights of the pre-training run at `path`, with how they were made (its extra, plus where they
    were exported and on what hardware), written to `dest` as a shipped reference checkpoint."""
    ckpt = common.load_checkpoint(path)
    extra = dict(ckpt["extra"], exported_from=path,
                 hardware=ckpt["extra"].get("hardware", "") + "; " + hardware())
    common.save_checkpoint(dest, {"ema": ckpt["state_dicts"]["ema"]}, ckpt["config"], extra)
    print(f"exported {dest} (step {extra['step']}, {extra['wall_s'] / 3600:.2f} h, "
          f"loss {extra['loss_last_100']})")
