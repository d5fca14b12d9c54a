"""KTO, reward-weighted fine-tuning (offline and AWM), timestep-segment DPO and the full-fine-tuning reference, on tiny real architectures."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines
from imgalign.cli import main
from imgalign.images import save_png
from imgalign.train.config import LoraConfig
from imgalign.train.loop import build_accelerator, setup_trainable
from imgalign.train.registry import load_method_config
from imgalign.train.run import MicroStep, Run, train
from conftest import assert_one_line_errors
from test_train_preference import PROMPTS, SIZE, _metrics, pairs_file  # noqa: F401  (fixture)
from test_train_preference import _overrides as _dpo_overrides


def _overrides(pipe: str, out: Path, **extra) -> list[str]:
    """The DPO tests' overrides, without the ``dpo`` section for the other methods."""
    keep_dpo = any(k.startswith("dpo__") for k in extra) or not any(k.split("__")[0] in ("kto", "rwr", "tpo") for k in extra)
    return [o for o in _dpo_overrides(pipe, out, **extra) if keep_dpo or not o.startswith("dpo.")]


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    """Reddish images labelled good, bluish ones bad (unpaired)."""
    root = tmp_path_factory.mktemp("labels")
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(6):
        red = i % 2 == 0
        tint = torch.tensor([0.6, 0.0, 0.0] if red else [0.0, 0.0, 0.6]).view(3, 1, 1)
        save_png(torch.rand(3, SIZE, SIZE, generator=g) * 0.3 + tint, root / f"img{i}.png")
        lines.append({"prompt": PROMPTS[i % 3], "image": f"img{i}.png", "label": "good" if red else "bad"})
    path = root / "labels.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _run(cfg, tmp_path: Path):
    return Run(cfg, build_accelerator(cfg.train, tmp_path), tmp_path)


# ----------------------------------------------------------------------------- full fine-tuning reference
def test_full_fine_tuning_keeps_a_frozen_copy_as_the_reference(sd15_dir):
    from imgalign.train.preference import frozen_copy, reference_denoiser

    base = pipelines.load(sd15_dir)
    for offload in (False, True):
        tuned = pipelines.load(sd15_dir)
        setup_trainable(tuned, LoraConfig(enabled=False))
        trainee = types.SimpleNamespace(adapter=tuned, reference=frozen_copy(tuned, offload=offload), reference_offload=offload)
        with torch.no_grad():
            for p in tuned.denoiser.parameters():
                p.add_(0.01 * torch.randn_like(p))  # training moves the policy, not the copy
        cond = base.encode_prompt(PROMPTS[:2], guidance_scale=1.0)
        schedule = base.schedule(20, height=SIZE, width=SIZE)
        x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = base.predict(x, schedule, 5, cond)
            policy = tuned.predict(x, schedule, 5, cond)
            with reference_denoiser(trainee):
                reference = tuned.predict(x, schedule, 5, cond)
        torch.testing.assert_close(reference, expected)
        assert (policy - expected).abs().max() > 1e-3
        assert tuned.denoiser is not trainee.reference  # the policy is back in place
        assert next(trainee.reference.parameters()).device.type == "cpu"
        assert not any(p.requires_grad for p in trainee.reference.parameters())


def test_full_fine_tuning_dpo_runs_and_saves_the_pipeline(sd15_dir, pairs_file, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    cfg = load_method_config("dpo", None, _overrides(sd15_dir, out, data__source="pairs", data__pairs=str(pairs_file),
                                                      lora__enabled="false", train__max_steps=2, optim__lr=1e-5,
                                                      dpo__reference_offload="true"))  # fmt: skip
    result = train(cfg)
    metrics = _metrics(out)
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-3) and metrics[1]["loss"] != metrics[0]["loss"]
    assert (result.weights_dir / "model_index.json").is_file()


def test_h_dpo_runs_from_the_cli_and_alpha_moves_the_first_loss_off_log_2(sd15_dir, pairs_file, tmp_path):  # noqa: F811
    """With policy == reference, DPO's first loss is log 2; H-DPO's alpha != 1 keeps a policy term: it is not."""
    out = tmp_path / "hdpo"
    assert main(["train", "dpo", *_overrides(sd15_dir, out, data__source="pairs", data__pairs=str(pairs_file),
                                             train__max_steps=1, dpo__alpha=0.5, dpo__beta=5000)]) == 0  # fmt: skip
    (first,) = _metrics(out)
    assert abs(first["loss"] - 0.6931) > 1e-3 and first["grad_norm"] > 0


def test_winner_preserving_dpo_scales_the_loser_and_logs_it(sd15_dir, pairs_file, tmp_path):  # noqa: F811
    from imgalign.train.preference import dpo_step, setup

    cfg = load_method_config("dpo", None, _overrides(sd15_dir, tmp_path, data__source="pairs", data__pairs=str(pairs_file),
                                                      train__batch_size=4, dpo__beta=50, dpo__winner_preserving="true"))  # fmt: skip
    trainee = setup(_run(cfg, tmp_path))
    out = dpo_step(trainee, MicroStep(step=0, index=0, process_index=0, seed=0))
    assert 0.0 <= out.metrics["loser_scale"] <= 1.0
    out.loss.backward()
    assert all(p.grad is not None for p in trainee.trainable.values())


def test_caption_dropout_is_seeded_by_the_micro_step():
    from imgalign.train.preference import drop_captions

    micro = MicroStep(step=0, index=3, process_index=0, seed=0)
    prompts = [f"p{i}" for i in range(200)]
    once, again = drop_captions(prompts, 0.3, micro), drop_captions(prompts, 0.3, micro)
    assert once == again and 30 < once.count("") < 90
    assert drop_captions(prompts, 0.0, micro) == prompts


# ----------------------------------------------------------------------------- KTO
def test_kto_on_a_labels_file_learns_the_labels(sd15_dir, labels_file, tmp_path):
    """One gradient step makes the policy's implicit reward rise on the good images and fall on the bad ones."""
    from imgalign.train.kto import kto_step, setup

    cfg = load_method_config("kto", None, _overrides(sd15_dir, tmp_path, data__source="labels", data__labels=str(labels_file),
                                                      train__batch_size=4, kto__beta=50, kto__num_timesteps=20))  # fmt: skip
    trainee = setup(_run(cfg, tmp_path))
    micro = MicroStep(step=0, index=0, process_index=0, seed=0)
    before = kto_step(trainee, micro)
    assert float(before.loss) == pytest.approx(0.5, abs=1e-4)  # policy == reference: 1 - sigmoid(0)
    before.loss.backward()
    with torch.no_grad():
        for p in trainee.trainable.values():
            p -= 1e-2 * p.grad
    after = kto_step(trainee, micro)
    assert float(after.loss) < 0.5 - 1e-4 and float(after.metrics["implicit_accuracy"]) > 0.5


def test_kto_on_policy_and_on_pairs_run_from_the_cli(sd15_dir, pairs_file, tmp_path):  # noqa: F811
    on_policy = tmp_path / "on_policy"
    assert main(["train", "kto", *_overrides(sd15_dir, on_policy, reward="test-dpo-red", train__max_steps=2,
                                             kto__candidates=3, kto__num_timesteps=20)]) == 0  # fmt: skip
    assert all(0 < m["used"] <= 1 for m in _metrics(on_policy))
    pairs = tmp_path / "pairs"
    assert main(["train", "kto", *_overrides(sd15_dir, pairs, data__source="pairs", data__pairs=str(pairs_file),
                                             train__max_steps=2, kto__num_timesteps=20)]) == 0  # fmt: skip
    assert (pairs / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_kto_labels_file_bad_rows_are_listed(sd15_dir, labels_file, tmp_path):
    from imgalign.train.kto import load_labelled_images

    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in labels_file.read_text().splitlines()]
    rows[1]["label"] = "maybe"
    rows[3]["image"] = "missing.png"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "img0.png").write_bytes((labels_file.parent / "img0.png").read_bytes())
    for i in (2, 4, 5):
        (tmp_path / f"img{i}.png").write_bytes((labels_file.parent / f"img{i}.png").read_bytes())
    with pytest.raises(ValueError, match=r"2 bad rows of 6 .*row 2: unknown label 'maybe'.*row 4: "):
        load_labelled_images(str(bad), SIZE)
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        assert len(load_labelled_images(str(bad), SIZE, skip_bad_rows=True)) == 4


# ----------------------------------------------------------------------------- reward-weighted
def test_group_advantages_are_standardised_within_each_prompt():
    from imgalign.losses import group_advantages

    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(scores, clip=5.0)
    torch.testing.assert_close(adv[0], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-3, rtol=0)
    assert torch.equal(adv[1], torch.zeros(3))  # a group with no spread teaches nothing
    assert group_advantages(torch.tensor([[0.0, 0.0, 0.0, 100.0]]), clip=1.0).max() == 1.0


def test_offline_reward_weighted_set_is_the_base_models_samples_weighted_by_the_reward(sd15_dir, tmp_path):
    from imgalign.train.pipeline import score
    from imgalign.train.reward_weighted import offline_step, setup

    cfg = load_method_config("rwr", None, _overrides(sd15_dir, tmp_path, reward="test-dpo-red", rwr__samples_per_prompt=2,
                                                      rwr__num_timesteps=20))  # fmt: skip
    trainee = setup(_run(cfg, tmp_path))
    w = trainee.weighted
    assert len(w.prompts) == 6 and w.prompts[:2] == [PROMPTS[0]] * 2
    images = trainee.adapter.decode(w.latents[:2].to(trainee.adapter.device))
    torch.testing.assert_close(score(trainee.reward, images, w.prompts[:2]).float(), w.weights[:2], atol=1e-5, rtol=1e-4)
    out = offline_step(trainee, MicroStep(step=0, index=0, process_index=0, seed=0))
    out.loss.backward()
    assert out.metrics["pretrain_error"] > 0 and all(p.grad is not None for p in trainee.trainable.values())


def test_awm_and_offline_rwr_run_from_the_cli(sd15_dir, labels_file, tmp_path):
    awm = tmp_path / "awm"
    assert main(["train", "rwr", *_overrides(sd15_dir, awm, reward="test-dpo-red", train__max_steps=2, rwr__mode="awm",
                                             rwr__candidates=3, rwr__kl_weight=0.1, rwr__num_timesteps=20)]) == 0  # fmt: skip
    metrics = _metrics(awm)
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0  # the policy leaves the reference after one update
    labels = tmp_path / "labels"
    assert main(["train", "rwr", *_overrides(sd15_dir, labels, data__source="labels", data__labels=str(labels_file),
                                             train__max_steps=2, rwr__num_timesteps=20)]) == 0  # fmt: skip
    assert (labels / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------- timestep-segment DPO
def test_tpo_trains_each_segment_only_on_its_own_steps_and_saves_a_routed_lora(sd15_dir, tmp_path):
    out = tmp_path / "tpo"
    per_segment = '[{reward: test-dpo-red}, {reward: test-dpo-red}]'
    args = ["train", "tpo", *_overrides(sd15_dir, out, reward="test-dpo-red", train__max_steps=2, tpo__candidates=3,
                                        tpo__num_timesteps=20, tpo__beta=200, optim__lr=1e-3, tpo__per_segment=per_segment)]  # fmt: skip
    assert main(args) == 0
    first, second = _metrics(out)
    assert first["segment"] == 0 and first["seg0/noise_level"] < 0.5  # alternate: seg0 = low noise at step 1
    assert second["segment"] == 1 and second["seg1/noise_level"] >= 0.5
    routing = json.loads((out / "lora" / "routing.json").read_text())
    assert routing["boundaries"] == [0.0, 0.5, 1.0] and routing["adapters"] == ["seg0", "seg1"]
    seg0 = load_file(out / "lora" / "seg0" / "pytorch_lora_weights.safetensors")
    seg1 = load_file(out / "lora" / "seg1" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in seg0.items() if "lora_B" in k or "lora.up" in k)  # both trained
    assert any(v.abs().max() > 0 for k, v in seg1.items() if "lora_B" in k or "lora.up" in k)


def test_tpo_alternate_updates_only_the_segment_trained_at_that_step(sd15_dir, tmp_path):
    from imgalign.train.segment_dpo import setup, tpo_step

    cfg = load_method_config("tpo", None, _overrides(sd15_dir, tmp_path, reward="test-dpo-red", tpo__candidates=3,
                                                      tpo__num_timesteps=20, tpo__beta=200))  # fmt: skip
    trainee = setup(_run(cfg, tmp_path))
    assert {n.split(".")[-2] for n in trainee.trainable} == {"seg0", "seg1"}
    out = tpo_step(trainee, MicroStep(step=1, index=1, process_index=0, seed=0))  # step 1: seg1
    out.loss.backward()
    grads = {n: p.grad for n, p in trainee.trainable.items()}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".seg0." in n)
    assert any(g is not None and g.abs().max() > 0 for n, g in grads.items() if ".seg1." in n)


def test_tpo_config_errors_are_one_line(sd15_dir, capsys):
    cases = {
        "tpo.segments=[0.0,0.7,0.5,1.0]": "boundaries",
        "tpo.per_segment=[{reward: test-dpo-red}]": "tpo.per_segment has 1 entries for 2 segments",
        "tpo.train_segments=[2]": "tpo.train_segments must name segments in 0..1",
        "lora.enabled=false": "one LoRA per segment",
    }
    assert_one_line_errors(main, "tpo", sd15_dir, "test-dpo-red", cases, capsys)


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_process_tpo_ends_with_the_same_segment_adapters_on_both_processes(sd15_dir, tmp_path):
    """Two CPU processes (gloo): the segment trained at a step is averaged, the other keeps no gradient on either."""
    import textwrap

    from conftest import launch_two_cpu_processes

    script = tmp_path / "launch_tpo.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        import test_train_preference  # registers the tiny reward
        from imgalign.cli import main
        from imgalign.train import get_method, register_method

        method, kept = get_method("tpo"), {{}}

        def setup(run):
            kept["trainee"], kept["rank"] = method.setup(run), run.process_index
            return kept["trainee"]

        register_method(dataclasses.replace(method, setup=setup), overwrite=True)
        code = main(sys.argv[1:])
        state = {{n: p.detach().contiguous() for n, p in kept["trainee"].trainable.items()}}
        save_file(state, {str(tmp_path)!r} + f"/rank-{{kept['rank']}}.safetensors")
        sys.exit(code)
    """))
    out = tmp_path / "ddp"
    args = ["train", "tpo", *_overrides(sd15_dir, out, reward="test-dpo-red", train__max_steps=2, train__batch_size=1,
                                        tpo__candidates=2, tpo__num_timesteps=20, tpo__beta=200, optim__lr=1e-3)]  # fmt: skip
    proc = launch_two_cpu_processes(script, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["segment"] for m in _metrics(out)] == [0.0, 1.0]
    rank0, rank1 = load_file(tmp_path / "rank-0.safetensors"), load_file(tmp_path / "rank-1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    for segment in ("seg0", "seg1"):
        assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k and f".{segment}." in k), segment
