"""The pipelines layer on tiny real architectures: parity with diffusers, log-probs, gradients, LoRA."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

import pipelines
from pipelines.architectures import FAMILIES, build_pipeline

SIZE = 32
PROMPTS = ["a red circle", "two blue squares"]
GUIDANCE = {"flux": 3.5, "flux-kontext": 2.5}
EDIT = {"flux-kontext", "instruct-pix2pix"}


def _generators(seed: int = 0, n: int = 2) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def _source_images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))


def _edit_kwargs(family: str) -> dict:
    return {"image": _source_images()} if family in EDIT else {}


def _pipe_kwargs(family: str) -> dict:
    kwargs = _edit_kwargs(family)
    if family == "flux-kontext":
        kwargs.update(_auto_resize=False, max_area=SIZE * SIZE)
    return kwargs


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory) -> dict[str, str]:
    """Each family saved with save_pretrained, so tests load through the directory path."""
    root = tmp_path_factory.mktemp("pipes")
    paths = {}
    for family in FAMILIES:
        path = root / family
        build_pipeline(family, "tiny", seed=0).save_pretrained(path)
        paths[family] = str(path)
    return paths


def _load(path: str) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_sampling_equals_pipeline_call(saved_pipelines, family):
    adapter = pipelines.load(saved_pipelines[family])
    pipe = _load(saved_pipelines[family])
    guidance = GUIDANCE.get(family, 6.0)
    expected = pipe(
        prompt=PROMPTS, num_inference_steps=3, guidance_scale=guidance, height=SIZE, width=SIZE,
        generator=_generators(), output_type="pt", **_pipe_kwargs(family),
    ).images  # fmt: skip
    images = adapter.sample(
        PROMPTS, num_steps=3, guidance_scale=guidance, height=SIZE, width=SIZE, generator=_generators(),
        **_edit_kwargs(family),
    )  # fmt: skip
    assert images.shape == (2, 3, SIZE, SIZE)
    assert 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def _gaussian_reference(x, mean, std):
    dist = torch.distributions.Normal(mean.double(), torch.as_tensor(std).double().expand_as(mean))
    return dist.log_prob(x.double()).mean(dim=tuple(range(1, x.ndim))).float()


@pytest.mark.parametrize(
    ("family", "method"), [("sd15", "ddim"), ("sd2-v", "ddim"), ("sd3", "sde"), ("sd3", "cps"), ("flux", "sde")]
)
def test_stochastic_step_logprob_is_gaussian_density_of_its_sample(family, method):
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=GUIDANCE.get(family, 4.0))
    sched = adapter.schedule(4, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        for i in range(2):
            out = adapter.predict(x, sched, i, cond)
            step = adapter.step_with_logprob(out, sched, i, x, method=method, generator=_generators(10 + i))
            reference = _gaussian_reference(step.prev_sample.float(), step.mean, step.std)
            torch.testing.assert_close(step.log_prob, reference, rtol=1e-4, atol=1e-4)
            # scoring the same transition again (the PPO ratio path) gives the same density
            again = adapter.step_with_logprob(out, sched, i, x, method=method, prev_sample=step.prev_sample)
            torch.testing.assert_close(again.log_prob, step.log_prob)
            assert not torch.equal(step.prev_sample, step.mean.to(step.prev_sample.dtype))
            x = step.prev_sample


def test_noiseless_stochastic_steps_reduce_to_the_deterministic_ones():
    """DDIM with eta=0 is the DDIM scheduler's step; Flow-GRPO's SDE with a=0 is the Euler step."""
    for family, method in (("sd15", "ddim"), ("sd3", "sde"), ("sd3", "cps")):
        adapter = pipelines.load(build_pipeline(family, "tiny"))
        cond = adapter.encode_prompt(PROMPTS, guidance_scale=4.0)
        sched = adapter.schedule(4, height=SIZE, width=SIZE)
        x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
        with torch.no_grad():
            out = adapter.predict(x, sched, 1, cond)
            stochastic = adapter.step_with_logprob(out, sched, 1, x, method=method, noise_level=0.0)
            deterministic = adapter.step(out, sched, 1, x)
        torch.testing.assert_close(stochastic.prev_sample, deterministic, atol=1e-5, rtol=1e-5)


def test_sde_step_matches_flow_grpo_formula():
    """std = a*sqrt(s/(1-s)); mean = x + v dt + std^2/(2s) (x + (1-s) v) dt; x' = mean + std sqrt(-dt) eps."""
    x, v, eps = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(3))
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    dt = sigma_next - sigma
    std = a * (sigma / (1 - sigma)) ** 0.5
    mean = x + v * dt + std**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    out = pipelines.flow_sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=a, prev_sample=mean + std * (-dt) ** 0.5 * eps)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std.expand_as(x), torch.full_like(x, std * (-dt) ** 0.5))


def test_sde_step_at_sigma_one_uses_the_schedules_second_sigma_by_default():
    """Flow-GRPO (sd3_sde_with_logprob.py): std = a*sqrt(s / (1 - where(s == 1, sigmas[1], s))).

    The first step of every flow schedule starts at sigma = 1, where sqrt(s / (1 - s)) is
    infinite; the default must give Flow-GRPO's value there, not a clamp-sized 1e5 std.
    """
    x, v = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(k)) for k in range(2))
    sigmas, a = [1.0, 0.8, 0.5, 0.0], 0.7
    sigma, sigma_next = sigmas[0], sigmas[1]
    dt = sigma_next - sigma
    std_t = a * (sigma / (1 - sigmas[1])) ** 0.5  # the published formula with sigma_max = sigmas[1]
    mean = x + v * dt + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    out = pipelines.flow_sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=a,
                                               generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.isfinite(out.std).all() and torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()
    torch.testing.assert_close(out.std.expand_as(x), torch.full_like(x, std_t * (-dt) ** 0.5))
    torch.testing.assert_close(out.mean, mean)
    # the default is the explicit sigma_max = sigmas[1] (what the adapters pass), per sample too
    explicit = pipelines.flow_sde_step_with_logprob(v, x, sigma, sigma_next, noise_level=a, sigma_max=sigmas[1],
                                                    prev_sample=out.prev_sample)  # fmt: skip
    torch.testing.assert_close(explicit.log_prob, out.log_prob)
    per_sample = pipelines.flow_sde_step_with_logprob(v, x, torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.0]),
                                                      noise_level=a, prev_sample=out.prev_sample)  # fmt: skip
    assert torch.isfinite(per_sample.std).all() and torch.isfinite(per_sample.log_prob).all()
    torch.testing.assert_close(per_sample.std[0].expand_as(x[0]), torch.full_like(x[0], std_t * (-dt) ** 0.5))
    # a schedule that stays at 1 has no finite Flow-GRPO std: say so rather than return 1e6
    with pytest.raises(ValueError, match="sigma_max"):
        pipelines.flow_sde_step_with_logprob(v, x, 1.0, 0.8, noise_level=a, sigma_max=1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_lora_through_last_step_x0_and_vae(family):
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    params = pipelines.add_lora(adapter, rank=4)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in adapter.denoiser.named_parameters() if "lora_" not in n)
    adapter.enable_gradient_checkpointing()
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=GUIDANCE.get(family, 4.0), **_edit_kwargs(family))
    sched = adapter.schedule(3, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        for i in range(len(sched) - 1):
            x = adapter.step(adapter.predict(x, sched, i, cond), sched, i, x)
    i = len(sched) - 1
    out = adapter.predict(x, sched, i, cond, detach_uncond=True)
    image = adapter.decode(adapter.pred_x0(out, sched, i, x))
    image.mean().backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_detached_unconditional_branch_gives_the_same_guided_output():
    adapter = pipelines.load(build_pipeline("sd15", "tiny"))
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=5.0)
    sched = adapter.schedule(3, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        joint = adapter.predict(x, sched, 0, cond)
    detached = adapter.predict(x, sched, 0, cond, detach_uncond=True)
    torch.testing.assert_close(detached, joint, atol=1e-5, rtol=1e-5)


def _perturb_lora(adapter: pipelines.DiffusionAdapter, seed: int = 0) -> None:
    """Stand-in for training: move every LoRA B matrix away from its zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipelines.lora_parameters(adapter):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_saved_lora_reloads_in_plain_diffusers(saved_pipelines, family, tmp_path, ddp):
    adapter = pipelines.load(saved_pipelines[family])
    base = adapter.sample(PROMPTS, num_steps=2, guidance_scale=GUIDANCE.get(family, 4.0), height=SIZE, width=SIZE, generator=_generators())
    pipelines.add_lora(adapter, rank=4)
    _perturb_lora(adapter)
    tuned = adapter.sample(PROMPTS, num_steps=2, guidance_scale=GUIDANCE.get(family, 4.0), height=SIZE, width=SIZE, generator=_generators())
    with pipelines.lora_disabled(adapter):
        reference = adapter.sample(PROMPTS, num_steps=2, guidance_scale=GUIDANCE.get(family, 4.0), height=SIZE, width=SIZE, generator=_generators())
    torch.testing.assert_close(reference, base)  # disabled adapter == the base model
    assert (tuned - base).abs().max() > 1e-3

    # A DDP wrapper around the denoiser must not leak into the saved keys ("module." prefixes).
    adapter.denoiser = ddp(adapter.denoiser)
    out_dir = pipelines.save_lora(adapter, tmp_path / "lora")
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()

    fresh = _load(saved_pipelines[family])
    fresh.load_lora_weights(str(out_dir))
    reloaded = fresh(
        prompt=PROMPTS, num_inference_steps=2, guidance_scale=GUIDANCE.get(family, 4.0), height=SIZE, width=SIZE,
        generator=_generators(), output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(reloaded, tuned, atol=1e-4, rtol=0)


@pytest.fixture
def ddp(monkeypatch):
    """A one-process gloo group, so the denoiser can be wrapped in a real DistributedDataParallel."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield torch.nn.parallel.DistributedDataParallel
    dist.destroy_process_group()


def test_unwrap_model_strips_ddp_and_compile_wrappers(ddp):
    inner = torch.nn.Linear(2, 2)
    assert pipelines.unwrap_model(torch.compile(inner)) is inner
    assert pipelines.unwrap_model(ddp(inner)) is inner


def test_attention_backends_work_or_fail_with_the_stated_message():
    adapter = pipelines.load(build_pipeline("sd15", "tiny"))
    kwargs = dict(num_steps=2, guidance_scale=4.0, height=SIZE, width=SIZE)
    sdpa = adapter.sample(PROMPTS, generator=_generators(), **kwargs)
    adapter.set_attention_backend("math")
    math = adapter.sample(PROMPTS, generator=_generators(), **kwargs)
    torch.testing.assert_close(math, sdpa, atol=1e-5, rtol=0)
    if not torch.cuda.is_available():
        with pytest.raises(pipelines.AttentionBackendError, match="use --attention sdpa"):
            adapter.set_attention_backend("flash")
        with pytest.raises(pipelines.AttentionBackendError, match="xformers"):
            adapter.set_attention_backend("xformers")
    with pytest.raises(pipelines.AttentionBackendError, match="unknown attention backend"):
        adapter.set_attention_backend("fastest")
    assert adapter.attention == "math"


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline directory not found"):
        pipelines.load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipelines.load(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(pipelines.UnsupportedPipelineError, match="WanPipeline"):
        pipelines.load(str(tmp_path))


def test_size_must_be_divisible_by_the_vae_factor():
    adapter = pipelines.load(build_pipeline("sd15", "tiny"))
    with pytest.raises(ValueError, match="divisible by"):
        adapter.schedule(2, height=30, width=32)


def test_encode_decode_round_trip_is_differentiable():
    adapter = pipelines.load(build_pipeline("sd3", "tiny"))
    images = _source_images().requires_grad_(True)
    latents = adapter.encode_images(images, sample=False)
    assert latents.shape[1] == adapter.vae.config.latent_channels
    adapter.decode(latents, checkpoint=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# Schedulers whose step builds on earlier ones (stored model outputs, or two stages per step).
MULTISTEP = ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler",
             "LMSDiscreteScheduler", "HeunDiscreteScheduler"]
SINGLE_STEP = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"]


def _with_scheduler(pipe_or_adapter, name: str):
    import diffusers

    # PNDM as Stable Diffusion configures it (PLMS steps only)
    overrides = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    scheduler = getattr(diffusers, name).from_config(pipe_or_adapter.scheduler.config, **overrides)
    if isinstance(pipe_or_adapter, pipelines.DiffusionAdapter):
        pipe_or_adapter.set_scheduler(scheduler)
    else:
        pipe_or_adapter.scheduler = scheduler
    return pipe_or_adapter


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                  "PNDMScheduler"])
def test_multistep_scheduler_in_order_equals_pipeline_call(saved_pipelines, name):
    adapter = _with_scheduler(pipelines.load(saved_pipelines["sd15"]), name)
    pipe = _with_scheduler(_load(saved_pipelines["sd15"]), name)
    kwargs = dict(guidance_scale=6.0, height=SIZE, width=SIZE)
    expected = pipe(prompt=PROMPTS, num_inference_steps=4, generator=_generators(), output_type="pt", **kwargs).images
    images = adapter.sample(PROMPTS, num_steps=4, generator=_generators(), **kwargs)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_pipes():
    """Tiny pipelines built once; each test below puts its own scheduler on them."""
    return {family: build_pipeline(family, "tiny") for family in ("sd15", "sd3")}


@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_scheduler_refuses_a_step_out_of_order(tiny_pipes, name):
    adapter = _with_scheduler(pipelines.load(tiny_pipes["sd15"]), name)
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=4.0)
    sched = adapter.schedule(4, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        out = adapter.predict(x, sched, 3, cond)  # predicting anywhere leaves the solver where it was
    with pytest.raises(ValueError, match=rf"^{name} is a multistep solver: .*got step 1 as the first step; "
                                         r".*single-step scheduler: adapter.set_scheduler\('ddim'\)"):
        adapter.step(out, sched, 1, x)
    x = adapter.step(out, sched, 0, x)
    with pytest.raises(ValueError, match="got step 2 after step 0"):
        adapter.step(out, sched, 2, x)
    adapter.step(out, sched, 1, x)  # the refused step changed nothing
    sched = adapter.schedule(4, height=SIZE, width=SIZE)  # a new schedule starts over
    adapter.step(out, sched, 0, x)


SINGLE_STEP_CASES = [("sd15", n) for n in SINGLE_STEP] + [("sd3", "FlowMatchEulerDiscreteScheduler")]


@pytest.mark.parametrize(("family", "name"), SINGLE_STEP_CASES)
def test_single_step_schedulers_step_from_any_index(tiny_pipes, family, name):
    """A step from index 2 is the same whether or not steps 0 and 1 ran before it."""
    adapter = _with_scheduler(pipelines.load(tiny_pipes[family]), name)
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=4.0)
    sched = adapter.schedule(4, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        out = adapter.predict(x, sched, 2, cond)
    first = adapter.step(out, sched, 2, x, _generators(7))
    y = x
    for i in range(2):
        y = adapter.step(out, sched, i, y, _generators(3))
    torch.testing.assert_close(adapter.step(out, sched, 2, x, _generators(7)), first)


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl", "instruct-pix2pix"])
def test_pred_x0_equals_the_schedulers_own_estimate(family):
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    cond = adapter.encode_prompt(PROMPTS, guidance_scale=4.0, **_edit_kwargs(family))
    sched = adapter.schedule(4, height=SIZE, width=SIZE)
    x = adapter.prepare_latents(2, SIZE, SIZE, _generators())
    with torch.no_grad():
        out = adapter.predict(x, sched, 1, cond)
        adapter.scheduler._step_index = 1
        expected = adapter.scheduler.step(out, sched.timesteps[1], x).pred_original_sample
        torch.testing.assert_close(adapter.pred_x0(out, sched, 1, x), expected, atol=1e-5, rtol=1e-5)
