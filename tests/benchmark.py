"""Speed on this machine: each script's sampler and training step, and the default runs' wall time estimated
from them. Prints numbers and asserts nothing: timings live here, not in the tests (pytest does not collect it).

    python tests/benchmark.py                 # all three tasks, a few minutes on 2 CPU cores
    python tests/benchmark.py --quick         # fewer samples, noisier numbers
    python tests/benchmark.py --only layout   # one task
    python tests/benchmark.py --only t2i      # text-to-image: images/s, training step, default run
    python tests/benchmark.py --only t2i_sd2  # SD2 at full size, random weights, 64 px on the CPU
    python tests/benchmark.py --only t2i_sd2 --device cuda --amp --px 512 --batch 8   # on a GPU

The estimates are rough: they count sampling and training only (not metrics, RDKit or FID features, nor first-run
caching; the reference's evaluation is counted, though a later run finds it cached), and time training steps on
the largest molecules or layouts. Other jobs slow everything down: the load average is printed with the numbers.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def timed(fn, repeat=1):
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def train_step_s(net, loss_fn, steps=10):
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    step()                                                                     # warm-up (allocations)
    return timed(step, steps)


def default_run(args, rate, step):
    """Samples of the default GRAFT run (reference and fine-tuned evaluation, M per round) and its estimated time."""
    samples = 2 * args.n_eval + args.rounds * args.M
    return {"default_run_samples": samples,
            "default_run_estimate_min": (samples / rate + args.rounds * args.ft_steps * step) / 60}


def molecule(quick):
    import graft_molecule as gm
    args = gm.parse_args([])
    data = gm.load_qm9(args.data_dir)["train"]
    hist = np.bincount(data["n"], minlength=gm.MAX_N + 1) / len(data["n"])
    ref, cfg = gm.load_reference(args.ref, torch.device("cpu"), {})
    abar, n = gm.make_abar(cfg), 50 if quick else 250
    n_atoms = np.random.RandomState(0).choice(len(hist), n, p=hist)
    s = timed(lambda: gm.sample(ref, ref, n_atoms, abar, args.N, batch=args.sample_batch, desc="molecule sampling"))
    rate = n / s
    idx = np.argsort(data["n"])[-args.batch_size:]                             # the largest molecules: worst case
    z, mask = gm.to_features(data["pos"][idx], data["types"][idx], cfg["include_charges"])
    net = gm.build_model(cfg).train()
    step = train_step_s(net, lambda: gm.shaped_loss(net, z, mask, abar, 1, cfg["T"]))
    return {"task": "molecule", "what": f"N {args.N}, {n} molecules", "samples_per_s": rate, "train_step_s": step,
            **default_run(args, rate, step)}


def layout(quick):
    import graft_layout as gl
    args = gl.parse_args([])
    data = gl.load_data(args.dataset)["train"]
    hist = np.bincount(data["n"], minlength=gl.MAX_N + 1) / len(data["n"])
    ref, cfg = gl.load_reference(args.ref, torch.device("cpu"), args.dataset)
    abar, n = gl.make_abar(cfg), 200 if quick else 1000
    n_elem = np.random.RandomState(0).choice(len(hist), n, p=hist)
    s = timed(lambda: gl.sample(ref, ref, n_elem, abar, args.N, batch=args.sample_batch, desc="layout sampling"))
    rate = n / s
    idx = np.argsort(data["n"])[-args.batch_size:]
    z, mask = gl.to_features(data["boxes"][idx], data["labels"][idx], cfg["n_classes"])
    net = gl.build_model(cfg).train()
    step = train_step_s(net, lambda: gl.shaped_loss(net, z, mask, abar, 1, cfg["T"]))
    return {"task": "layout", "what": f"N {args.N}, {n} layouts", "samples_per_s": rate, "train_step_s": step,
            **default_run(args, rate, step)}


def noise(quick):
    import noise_correction as nc
    args = nc.parse_args([])
    cfg = nc.model_config(args, 1)
    base = nc.build_model(cfg).eval().requires_grad_(False)
    corr = nc.build_model(nc.corrector_config(cfg, args.corrector_width, args.plain_corrector)).eval().requires_grad_(False)
    B = 100 if quick else args.sample_batch
    x, t = torch.randn(B, 1, args.image_size, args.image_size), torch.full((B,), 0.5)
    with torch.no_grad():
        base_s, corr_s = timed(lambda: base(x, t), 3) / B, timed(lambda: corr(x, t), 3) / B   # per image and forward
    x1 = torch.rand(args.batch_size, 1, args.image_size, args.image_size) * 2 - 1
    net = nc.build_model(cfg).train()
    step = train_step_s(net, lambda: nc.rf_loss(net, x1), 3)
    # the default evaluation: the base at each step count of the curve (N' included), then the corrected sampler
    # (N_c corrector forwards, then N base forwards); n_eval images x fid_seeds FIDs each
    flops = {"base": nc.flops_per_forward(base, 1, args.image_size, torch.device("cpu")),
             "corrector": nc.flops_per_forward(corr, 1, args.image_size, torch.device("cpu"))}
    secs = {"base": base_s, "corrector": corr_s}                     # sampler_flops is linear: seconds work too
    est = (sum(nc.sampler_flops(secs, N) for N in nc.base_step_counts(args, [nc.matched_steps(args, flops, N_c)
                                                                            for N_c in args.N_c]))
           + sum(nc.sampler_flops(secs, args.N, N_c) for N_c in args.N_c)) * args.n_eval * args.fid_seeds
    return {"task": "noise_correction", "what": f"cpu preset, batch {B}", "base_forwards_per_s": 1 / base_s,
            "corrector_forwards_per_s": 1 / corr_s,
            "flops_per_forward": flops["base"],
            "train_step_s": step, "base_pretrain_estimate_h": args.train_steps * step / 3600,
            "default_eval_estimate_min": est / 60}


def t2i(quick):
    import graft_t2i as gt
    from t2i_world import tokenize
    args = gt.parse_args([])
    if os.path.isfile(args.ref):
        ref, cfg = gt.load_reference(args.ref, torch.device("cpu"))
    else:                                                   # before the reference is shipped: a fresh model
        cfg = gt.model_config(args)
        ref = gt.build_model(cfg).eval()
    abar, n = gt.make_abar(cfg), 64 if quick else 256
    prompts = gt.eval_prompts(args)[:n]
    s = timed(lambda: gt.sample(ref, ref, prompts, abar, args.N, 0, args.eta, args.guidance,
                                args.sample_batch, torch.Generator().manual_seed(0)))
    rate = n / s
    train_prompts = gt.draw_prompts(gt.finetune_pools(args), args.batch_size, np.random.default_rng(0))
    x0 = gt.render_prompts(train_prompts, np.random.default_rng(0), cfg["image_size"])
    ids = tokenize(train_prompts)
    net = gt.build_model(cfg).train()
    step = train_step_s(net, lambda: gt.shaped_loss(net, x0, ids, abar, 1, cfg["T"]))
    samples = 2 * args.n_eval + args.rounds * args.prompts_per_round * args.M
    return {"task": "t2i", "what": f"N {args.N}, w {args.guidance} (2 passes per step), {n} images",
            "images_per_s": rate, "train_step_s": step, "default_run_samples": samples,
            "default_run_estimate_min": (samples / rate + args.rounds * args.ft_steps * step) / 60}


def t2i_sd2(quick, device="cpu", amp=False, px=64, batch=2):
    """SD2-base's UNet, VAE and text encoder at their full size with random weights (no download), a LoRA
    rank 4: seconds per image for DDIM sampling with CFG (timed over a few steps, extrapolated to N 50, plus
    the VAE decode) and for one LoRA training step of the shaped loss, and the peak memory on a GPU."""
    import graft_t2i as gt
    import sd2
    from sd2_clip import SD2_TEXT_CONFIG, CLIPTextEncoder
    dev, dtype = torch.device(device), torch.bfloat16 if amp else torch.float32

    def tokenizer(prompts):                                 # timing does not depend on the tokens
        return torch.tensor([[49406] + [320] * 8 + [49407] + [0] * 67] * len(prompts))
    unet_cfg = sd2.SD2_UNET_CONFIG | {"sample_size": px // 8}
    model = sd2.SD2(sd2.UNet(unet_cfg), sd2.AutoencoderKL(sd2.SD2_VAE_CONFIG),
                    CLIPTextEncoder.from_config(SD2_TEXT_CONFIG), tokenizer, sd2.SD2_SCHEDULER_CONFIG)
    model = model.to(dev, dtype).eval()
    lora = model.add_lora(4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    steps, prompts = 2 if quick else 3, ["a photo"] * batch
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(n):
        gt.sample(model.adapter(True), model.adapter(False), prompts, model.abar.cpu(), n, 0, 1.0, 7.5,
                  batch, torch.Generator().manual_seed(0), amp)
        sync()
    run(1)                                                                       # warm-up
    per_step = (timed(lambda: run(steps + 1)) - timed(lambda: run(1))) / steps / batch
    decode = timed(lambda: (gt.decode(model, torch.randn(batch, 4, px // 8, px // 8), amp), sync())) / batch
    mem_sample = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
    ft, abar = model.adapter(True), model.abar.cpu()
    x_s, ids = torch.randn(batch, 4, px // 8, px // 8).to(dev), tokenizer(prompts).to(dev)
    opt = torch.optim.Adam(lora.parameters(), lr=1e-5)

    def step():
        with common.autocast(dev, amp):
            loss = gt.shaped_loss(ft, x_s, ids, abar, 251, 1000, float(abar[250]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
    ft.train()
    step()
    train = timed(step, 2 if quick else 3)
    mem_train = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
    return {"task": "t2i_sd2", "what": f"{px} px, batch {batch}, {dtype}, {device}",
            "cfg_step_s_per_image": per_step, "image_s_N50_cfg": 50 * per_step + decode,
            "lora_train_step_s": train, "train_s_per_image": train / batch,
            "peak_gib_sampling": mem_sample, "peak_gib_training": mem_train}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (noisier numbers)")
    p.add_argument("--only", choices=["molecule", "layout", "noise_correction", "t2i", "t2i_sd2"],
                   help="benchmark one task (t2i_sd2 only when named)")
    p.add_argument("--device", default="cpu", help="t2i_sd2: cpu or cuda")
    p.add_argument("--amp", action="store_true", help="t2i_sd2: bf16 weights and autocast")
    p.add_argument("--px", type=int, default=64, help="t2i_sd2: image side (512 is SD2-base's)")
    p.add_argument("--batch", type=int, default=2, help="t2i_sd2: images per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    sd2_run = lambda quick: t2i_sd2(quick, args.device, args.amp, args.px, args.batch)   # noqa: E731
    for name, fn in (("molecule", molecule), ("layout", layout), ("noise_correction", noise), ("t2i", t2i),
                     ("t2i_sd2", sd2_run)):
        if args.only == name or (args.only is None and name != "t2i_sd2"):
            r = fn(args.quick)
            print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()), flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
