"""sd2.py against the reference library (diffusers, a test-only dependency): strict state_dict loading and equal
outputs on small random configs of SD2's architecture, equal keys and shapes at SD2's full size, one DDIM step
equal to diffusers' scheduler, LoRA's properties, and loading from a local Hub cache with HF_HUB_OFFLINE=1."""
import json

import pytest
import torch

import sd2

diffusers = pytest.importorskip("diffusers")

SMALL_UNET = sd2.SD2_UNET_CONFIG | dict(sample_size=16, block_out_channels=[32, 64, 64, 64],   # SD2's blocks,
                                       attention_head_dim=[2, 4, 4, 4], cross_attention_dim=24,     # narrow
                                       norm_num_groups=8)
SMALL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
                 layers_per_block=2, norm_num_groups=8, scaling_factor=0.18215, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def diffusers_unet(cfg):
    keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "attention_head_dim", "cross_attention_dim", "use_linear_projection", "norm_num_groups",
            "norm_eps", "flip_sin_to_cos", "freq_shift", "upcast_attention", "down_block_types",
            "up_block_types")
    return diffusers.UNet2DConditionModel(**{k: cfg[k] for k in keys})


def diffusers_vae(cfg):
    return diffusers.AutoencoderKL(**{k: v for k, v in cfg.items() if k != "sample_size"},
                                   sample_size=cfg["sample_size"])


def randomise(module, seed=0):
    """Every weight random (norm scales near 1), so that no zero-initialised part hides a wiring error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(scale))


@pytest.mark.parametrize("upcast", [False, True])
def test_unet_loads_diffusers_weights_strictly_and_matches_its_outputs(upcast):
    cfg = SMALL_UNET | {"upcast_attention": upcast}
    torch.manual_seed(0)
    ref = diffusers_unet(cfg).eval()
    randomise(ref)
    ours = sd2.UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24)                       # (B, 4, h, w), (B, L, D)
    t = torch.tensor([3.0, 871.5])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_vae_loads_diffusers_weights_strictly_and_matches_encode_and_decode():
    torch.manual_seed(0)
    ref = diffusers_vae(SMALL_VAE).eval()
    randomise(ref, 1)
    ours = sd2.AutoencoderKL(SMALL_VAE).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    img, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert torch.allclose(mean, dist.mean, atol=1e-4) and torch.allclose(logvar, dist.logvar, atol=1e-4)
        assert torch.allclose(ours.decode(z), ref.decode(z).sample, atol=1e-4)


def test_full_size_state_dict_keys_and_shapes_equal_diffusers():
    """SD2-base's UNet (865M parameters) and VAE built on the meta device: no memory, no download."""
    with torch.device("meta"):
        pairs = [(sd2.UNet(sd2.SD2_UNET_CONFIG), diffusers_unet(sd2.SD2_UNET_CONFIG)),
                 (sd2.AutoencoderKL(sd2.SD2_VAE_CONFIG),
                  diffusers_vae(sd2.SD2_VAE_CONFIG | {"down_block_types": ["DownEncoderBlock2D"] * 4,
                                                      "up_block_types": ["UpDecoderBlock2D"] * 4}))]
    for ours, ref in pairs:
        a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert a == b
    assert sum(v.numel() for v in pairs[0][0].state_dict().values()) == 865_910_724


def test_vae_hub_state_dict_renames_only_the_old_attention_names():
    ref = sd2.AutoencoderKL(SMALL_VAE).state_dict()
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in ref.items()}
    assert set(sd2.vae_hub_state_dict(dict(old))) == set(ref)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_ddim_step_equals_diffusers_scheduler(prediction, eta):
    """graft_t2i's DDIM step on SD2's schedule (graft's t = the Hub's timestep + 1, x0_hat not clamped) equals
    DDIMScheduler.step with the same model output and the same step noise."""
    import graft_t2i
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type=prediction, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1)
    sched.set_timesteps(20)
    abar = sd2.sd2_abar(sd2.SD2_SCHEDULER_CONFIG)
    assert torch.allclose(abar[1:], sched.alphas_cumprod.float())
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for hub_t in sched.timesteps[[0, 7, 18]].tolist():
        prev = hub_t - 1000 // 20
        want = sched.step(out, hub_t, x, eta=eta, variance_noise=noise).prev_sample
        t = torch.full((2,), hub_t + 1)
        eps = out
        if prediction == "v_prediction":
            a = abar[t].view(-1, 1, 1, 1)
            eps = a.sqrt() * out + (1 - a).sqrt() * x
        mean, std = graft_t2i.ddim_mean_std(eps, x, abar, hub_t + 1, prev + 1, eta, clip=False)
        got = mean + std * noise
        assert torch.allclose(got, want, atol=1e-5), (hub_t, (got - want).abs().max())


def lora_unet(seed=0):
    torch.manual_seed(seed)
    unet = sd2.UNet(SMALL_UNET).eval()
    return unet, sd2.LoRA(unet, rank=3, alpha=6.0)


def test_zero_initialised_lora_leaves_the_unet_unchanged_and_adapts_every_attention_projection():
    unet, lora = lora_unet()
    n_attn = sum(1 for n, m in unet.named_modules() if n.endswith(("attn1", "attn2")))
    assert len(lora.targets) == 4 * n_attn and set(unet.state_dict()) == set(sd2.UNet(SMALL_UNET).state_dict())
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        on = unet(x, t, ctx)
        lora.enabled = False
        off = unet(x, t, ctx)
    assert torch.equal(on, off)


def test_merged_and_unmerged_lora_agree_and_unmerge_restores_the_base():
    unet, lora = lora_unet()
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(0, 0.05)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24)
    with torch.no_grad():
        lora.enabled = False
        plain = unet(x, t, ctx)
        lora.enabled = True
        unmerged = unet(x, t, ctx)
        lora.merge()
        merged = unet(x, t, ctx)
        lora.unmerge()
    assert (unmerged - plain).abs().max() > 1e-3                                    # the adapter does act
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert all(torch.allclose(v, base[k], atol=1e-6) for k, v in unet.state_dict().items())


class StubText(torch.nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.emb = torch.nn.Embedding(64, d)

    def forward(self, ids):
        return self.emb(ids % 64)                                                    # (B, L, d)


class StubTokenizer:
    def __call__(self, prompts):
        return torch.tensor([[len(p) % 60 + 1, 3, 2] for p in prompts])


def small_sd2(prediction="epsilon"):
    torch.manual_seed(0)
    unet, vae = sd2.UNet(SMALL_UNET), sd2.AutoencoderKL(SMALL_VAE | {"sample_size": 128})
    return sd2.SD2(unet, vae, StubText(), StubTokenizer(),
                   sd2.SD2_SCHEDULER_CONFIG | {"prediction_type": prediction}).eval()


def test_stitched_sampler_uses_the_adapter_exactly_above_s():
    """P-GRAFT with one UNet: graft_t2i.sample(adapter on, adapter off, N_I) calls the adapted UNet at every
    t > s = tau_{N_I} and the plain one at t <= s."""
    import graft_t2i
    model = small_sd2()
    model.add_lora(rank=2)
    calls = []
    model.unet.register_forward_hook(lambda m, a, o: calls.append((float(a[1].flatten()[0]),
                                                                   model.lora.enabled)))
    N, N_I = 10, 4
    graft_t2i.sample(model.adapter(True), model.adapter(False), ["a red cube", "two dogs"], model.abar, N, N_I,
                     eta=1.0, w=1.0, gen=torch.Generator().manual_seed(0))
    s = int(graft_t2i.common.time_grid(1000, N)[N_I])
    assert len(calls) == N
    assert all(on == (hub_t + 1 > s) for hub_t, on in calls), calls


def test_sd2_wrapper_turns_v_prediction_into_eps():
    model = small_sd2("v_prediction")
    x, t, ids = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 900.0]), model.tokenize(["a", "b"])
    with torch.no_grad():
        v = model.unet(x, t - 1, model.encode(ids))
        a = model.abar[t.long()].view(-1, 1, 1, 1)
        assert torch.allclose(model(x, t, ids), a.sqrt() * v + (1 - a).sqrt() * x, atol=1e-6)


# -- the Hub: a local cache with the layout a download leaves, read with HF_HUB_OFFLINE=1 ---------------------

def write_hub_cache(root, repo_id, files, commit="0" * 40):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<path>}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path, write in files.items():
        dest = repo / "snapshots" / commit / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        write(dest)


def tiny_repo(tmp_path, drop=(), bad_unet=False):
    from safetensors.torch import save_file
    import sd2_clip
    text_cfg = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, vocab_size=520, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    unet_cfg = SMALL_UNET | {"block_out_channels": [32, 64, 64, 32]} if bad_unet else SMALL_UNET
    parts = {"unet": (SMALL_UNET, sd2.UNet(unet_cfg)), "vae": (SMALL_VAE, sd2.AutoencoderKL(SMALL_VAE)),
             "text_encoder": (text_cfg, sd2_clip.CLIPTextEncoder.from_config(text_cfg))}
    bytes_ = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(bytes_ + [b + "</w>" for b in bytes_] + ["!", "!</w>"])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    files = {"scheduler/scheduler_config.json": lambda p: p.write_text(json.dumps(sd2.SD2_SCHEDULER_CONFIG)),
             "tokenizer/vocab.json": lambda p: p.write_text(json.dumps(vocab)),
             "tokenizer/merges.txt": lambda p: p.write_text("#version: 0.2\n"),
             "tokenizer/special_tokens_map.json": lambda p: p.write_text(json.dumps({"pad_token": "!"}))}
    for sub, (cfg, net) in parts.items():
        stem = "model" if sub == "text_encoder" else "diffusion_pytorch_model"
        files[f"{sub}/config.json"] = lambda p, c=cfg: p.write_text(json.dumps(c))
        files[f"{sub}/{stem}.fp16.safetensors"] = lambda p, n=net: save_file(
            {k: v.half().contiguous() for k, v in n.state_dict().items()}, str(p))
    write_hub_cache(tmp_path, "org/tiny-sd2", {k: v for k, v in files.items() if k not in drop})
    return {k: n for k, (_, n) in parts.items()}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with tmp_path as the Hub cache (huggingface_hub reads both into `constants`)."""
    from huggingface_hub import constants
    for name, value in (("HF_HUB_CACHE", str(tmp_path)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(constants, name, value)
    return tmp_path


def test_load_sd2_reads_a_local_hub_cache_offline(offline_cache):
    nets = tiny_repo(offline_cache)
    model = sd2.load_sd2("org/tiny-sd2")
    for sub, net in nets.items():
        want = {k: v.half().float() for k, v in net.state_dict().items()}
        got = getattr(model, sub).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), sub
    ids = model.tokenize(["ab"])                              # no merges: one token per letter, the last '</w>'
    assert ids[0, :4].tolist() == [54, 0, 1 + 26, 55] and ids.shape == (1, 77) and ids[0, 4:].eq(52).all()


@pytest.mark.parametrize("drop, bad, message", [
    (("vae/config.json",), False, "could not get vae/config.json of org/tiny-sd2"),
    (("tokenizer/merges.txt",), False, "could not get tokenizer/merges.txt"),
    ((), True, "org/tiny-sd2 unet does not match its config")])
def test_a_missing_or_mismatched_hub_file_is_one_clear_error(offline_cache, drop, bad, message):
    tiny_repo(offline_cache, drop, bad)
    with pytest.raises(sd2.SD2LoadError) as e:
        sd2.load_sd2("org/tiny-sd2")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", [["--n_i", "0.5"], ["--algo", "ddpo", "--ddpo_lr", "1e-2"]])
def test_graft_t2i_preset_sd2_runs_p_graft_and_ddpo_with_lora_end_to_end(offline_cache, method):
    """graft_t2i.py --preset sd2 on a tiny SD2 in the Hub's layout: one P-GRAFT or DDPO round trains only the
    adapter (state.pt holds the LoRA weights alone, and they moved), the world's VQA reward, checker and judge
    still work on SD2's larger images, and a second call resumes with nothing left to do."""
    import graft_t2i
    tiny_repo(offline_cache)
    out = offline_cache / "run"
    argv = ["--preset", "sd2", "--repo", "org/tiny-sd2", "--reward", "vqa", *method, "--N", "4",
            "--M", "4", "--K", "2", "--prompts_per_round", "2", "--rounds", "1", "--ft_steps", "3",
            "--batch_size", "2", "--ft_lr", "1e-2", "--n_eval", "12", "--eval_per_prompt", "2",
            "--guidance", "2",
            "--sample_batch", "8", "--out", str(out)]
    res = graft_t2i.main(argv)
    state = torch.load(out / "state.pt", weights_only=True)["state_dicts"]["model"]
    assert state and all(k.startswith(("A.", "B.")) for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if k.startswith("B."))      # the adapter moved
    assert res["reference"]["metrics"]["checker"] is not None and res["finetuned"]["n_samples"] == 10
    assert (out / "grid.png").exists() and (out / "rounds.png").exists()
    assert graft_t2i.main(argv)["rounds"] == res["rounds"]                    # resumes: nothing to redo


def test_vqascore_reward_pairs_each_image_with_its_own_prompt(monkeypatch):
    """sd2.VQAScore through a stand-in t2v_metrics whose score is (image mean brightness) x (text length): the
    reward of image i must be its score against prompts[i], in the input order; without the package, one line."""
    import sys
    import types

    from PIL import Image

    class FakeVQAScore:
        def __init__(self, model, device):
            self.model = model

        def __call__(self, images, texts):                    # (n_images, n_texts), as t2v-metrics returns
            bright = torch.tensor([float(np.asarray(Image.open(p)).mean()) for p in images])
            return bright[:, None] * torch.tensor([float(len(t)) for t in texts])[None]

    import numpy as np
    monkeypatch.setitem(sys.modules, "t2v_metrics", types.SimpleNamespace(VQAScore=FakeVQAScore))
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 4)           # (5, 3, 4, 4)
    prompts = ["ab", "abcd", "ab", "abc", "abcd"]
    r = sd2.VQAScore("clip-flant5-xl")(images, prompts)
    bright = ((torch.linspace(-1, 1, 5) + 1) * 127.5).round()
    assert torch.allclose(r, bright * torch.tensor([2.0, 4, 2, 3, 4]))
    monkeypatch.setitem(sys.modules, "t2v_metrics", None)                           # import fails
    with pytest.raises(SystemExit, match="pip install t2v-metrics"):
        sd2.VQAScore()


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    unet, lora = lora_unet()
    with torch.no_grad():
        for b in lora.B.values():
            b.normal_(0, 0.05)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 24)
    grads = []
    for ckpt in (False, True):
        unet.train(), lora.zero_grad(set_to_none=True)
        unet.gradient_checkpointing = ckpt
        unet(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
