"""The ``README.md`` model card written beside a trained LoRA / pipeline / reward, as diffusers' training scripts do.

Built with the same pieces diffusers' ``train_*_lora.py`` scripts use (``huggingface_hub``'s
``ModelCard.from_template`` on diffusers' training template, then
``diffusers.utils.hub_utils.populate_model_card`` for the library name and tags), so the
directory is ready for ``huggingface_hub.upload_folder``. We do not call
``load_or_create_model_card`` itself: it first looks the card up on the Hub under the given
name, which for a local output directory is a network call (or an invalid repo id).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

#: Metrics that describe the machine, not the model: left out of the card.
_NOT_MODEL_METRICS = {"step_time_s", "samples_per_s", "skipped", "lr", "loss_scale"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def metrics_for_card(history: list[dict[str, float]]) -> dict[str, float]:
    """The last value of every model metric in the run's history (training and validation)."""
    out: dict[str, float] = {}
    for record in history:
        for key, value in record.items():
            if key != "step" and key not in _NOT_MODEL_METRICS and isinstance(value, (int, float)) and math.isfinite(value):
                out[key] = float(value)
    return out


def _describe_reward(reward: Any) -> str:
    if isinstance(reward, dict):
        return " + ".join(f"{w:g} x `{name}`" for name, w in reward.items())
    return f"`{reward}`" if reward else "none"


def write_model_card(directory: str | Path, *, config: dict[str, Any], method: str, method_help: str, steps: int,
                     metrics: dict[str, float]) -> Path:  # fmt: skip
    """Write ``directory/README.md``: base model, method, reward, steps, final metrics, how to load it."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    directory = Path(directory)
    base = str(config.get("pipeline") or "")
    kind = "LoRA" if (directory / "pytorch_lora_weights.safetensors").is_file() or (directory / "routing.json").is_file() \
        else "reward model" if (directory / "reward.json").is_file() else "fine-tuned pipeline"  # fmt: skip
    if base in ("shapes", "shapes-edit"):
        base_text = f"the Shapes model shipped with imgalign (`--pipeline {base}`)"
    elif base:
        base_text = f"`{base}`"
    else:
        model = config.get("model", {})
        base_text = f"reward `{model.get('reward', {}).get('name', '?')}`" if isinstance(model, dict) else "?"
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())) or "| (none logged) | |"
    if kind == "LoRA" and (directory / "routing.json").is_file():
        usage = (f"imgalign sample --pipeline {base or 'BASE'} --sampler segments --lora {directory} "
                 "--prompt \"...\" --out samples/")  # fmt: skip
        snippet = f"```bash\n{usage}\n```"
    elif kind == "LoRA" and base in ("shapes", "shapes-edit"):
        snippet = (f"```python\nimport pipelines\n\nadapter = pipelines.load({base!r})\n"
                   f"pipelines.load_lora(adapter, {str(directory)!r})\n```\n\n"
                   f"or `imgalign sample --pipeline {base} --lora {directory} --prompt \"...\" --out samples/`")  # fmt: skip
    elif kind == "LoRA":
        snippet = ("```python\nfrom diffusers import DiffusionPipeline\n\n"
                   f"pipe = DiffusionPipeline.from_pretrained({base!r})\n"
                   f"pipe.load_lora_weights({str(directory)!r})\n```\n\n"
                   f"or `imgalign sample --pipeline {base or 'BASE'} --lora {directory} --prompt \"...\" --out samples/`")  # fmt: skip
    elif kind == "reward model":
        snippet = f"```python\nimport rewards\n\nreward = rewards.load({str(directory)!r})\n```"
    else:
        snippet = f"```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained({str(directory)!r})\n```"
    description = (
        f"# {method} {kind}\n\n"
        f"A {kind} trained from {base_text} with imgalign's `{method}` method"
        f"{f' ({method_help})' if method_help else ''} "
        f"for {steps} optimizer steps; reward: {_describe_reward(config.get('reward'))}.\n\n"
        f"## Final metrics (step {steps})\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"## Use it\n\n{snippet}\n\n"
        "The full training config is `config.yaml` in the run directory; `imgalign train "
        f"{method} --config config.yaml` reruns it."
    )
    card_data = ModelCardData(library_name="diffusers", base_model=base if _HUB_ID.match(base) else None)
    card = ModelCard.from_template(card_data, template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    tags = ["imgalign", method, "text-to-image", "diffusers"]
    tags += ["lora", "diffusers-training"] if kind == "LoRA" else ["reward-model"] if kind == "reward model" else []
    card = populate_model_card(card, tags=tags)
    path = directory / "README.md"
    card.save(path)
    return path


__all__ = ["metrics_for_card", "write_model_card"]
