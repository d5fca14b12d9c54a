"""FSDP for every trainer: the trainable module sharded with FSDP2 ``fully_shard`` (``train.distributed: fsdp``).

Plain data parallelism (``ddp``, the default) keeps a whole copy of the model, its gradients
and its optimizer state on every process; full fine-tuning of SDXL, SD3.5 or FLUX.1 does not
fit one device that way. Under ``fsdp`` each process holds ``1/N`` of the trainable module's
weights, gradients and AdamW state: every transformer/UNet block is gathered just before it
runs and freed after, and gradients are reduce-scattered (averaged) in backward.

How the module is sharded (:func:`shard_trainable`):

* one FSDP unit per block of the block lists diffusers' denoisers keep — ``down_blocks``,
  ``mid_block``, ``up_blocks`` (``UNet2DConditionModel``), ``transformer_blocks``
  (``SD3Transformer2DModel``, ``FluxTransformerBlock``\\ s) and ``single_transformer_blocks``
  (``FluxTransformer2DModel``); a module without these (a reward model) is split at the
  classes its ``_no_split_modules`` names (transformers' and diffusers' own list of blocks);
  then the root, which takes the remaining weights (embeddings, norms, heads);
* ``train.mixed_precision: bf16`` -> ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``: the fp32 master shards stay fp32 (as in single-process full
  fine-tuning); ``train.fsdp.cpu_offload`` -> ``CPUOffloadPolicy``;
  ``train.fsdp.reshard_after_forward``; ``train.fsdp.activation_checkpointing`` recomputes each
  sharded block in backward.

Why ``fully_shard`` is called here rather than through accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)`` and ``accelerator.prepare(model, optimizer)``
(accelerate 1.15):

* accelerate enables FSDP only for accelerator devices: ``AcceleratorState`` switches
  ``distributed_type`` to FSDP for MULTI_GPU/NPU/XPU/... but not for MULTI_CPU (``state.py``), so
  the 2-process CPU runs that test this code would silently train unsharded;
* its activation checkpointing wraps blocks in ``CheckpointWrapper``, which renames every
  parameter (``..._checkpoint_wrapped_module...``); our checkpoints and the exported diffusers
  LoRA/pipeline are keyed by the model's own names. Here checkpointing wraps the block's
  ``forward`` instead, and names do not change;
* the trainers need the sharded parameters by their names (checkpoints, EMA, LoRA export),
  which accelerate's prepare re-maps only inside the optimizer.

An accelerate launch config with ``distributed_type: FSDP`` is still accepted (launch
configs from the field use it): :func:`check_launch_config` requires ``train.distributed:
fsdp``, ``fsdp_version: 2`` and the same options as ``train.fsdp.*``.

FSDP2 keeps the module's class (it derives ``FSDP<Class>`` from it), so the adapters still
read ``denoiser.config``; every call of a sharded module is a collective, so **every process
must call the denoiser the same number of times per micro-step** (choices that set that
number are drawn with :meth:`imgalign.train.run.MicroStep.steps_rng`, the same on every
process under FSDP).

Checkpoints hold full (unsharded) tensors, gathered with
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)`` and written by the main
process through the atomic :class:`~imgalign.train.checkpoint.CheckpointManager`; on resume
every process reads the same files and ``set_model_state_dict`` / ``set_optimizer_state_dict``
keep each process's shard. So a run resumes exactly, onto any number of processes, with
DDP or FSDP. (Not ``broadcast_from_rank0``: it sends the state dict's structure with
``broadcast_object_list``, i.e. pickles.)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import LoopConfig

#: Attributes of diffusers denoisers that hold their blocks (one FSDP unit per block).
BLOCK_LISTS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def _full_state_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


# ============================================================================ launch checks
def check_launch_config(loop: LoopConfig, env: dict[str, str] | None = None) -> None:
    """An accelerate FSDP launch (``distributed_type: FSDP``) must agree with the run's config.

    ``accelerate launch`` exports the launch config's ``fsdp_config`` as ``FSDP_*`` variables.
    """
    env = dict(os.environ if env is None else env)
    launched_fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if loop.distributed == "fsdp" and loop.mixed_precision == "fp16":
        raise ValueError("train.distributed=fsdp with train.mixed_precision=fp16: fp16 loss scaling is not sharded "
                         "here; use train.mixed_precision=bf16 (or no)")  # fmt: skip
    if not launched_fsdp:
        return
    if loop.distributed != "fsdp":
        raise ValueError("the accelerate launch config says distributed_type: FSDP but the run has train.distributed="
                         f"{loop.distributed}: add train.distributed=fsdp (imgalign shards the model itself)")  # fmt: skip
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"the accelerate launch config has fsdp_version: {version}; imgalign uses FSDP2: set "
                         "fsdp_version: 2 (see recipes/accelerate/fsdp_8gpu.yaml)")  # fmt: skip
    wanted = {"FSDP_RESHARD_AFTER_FORWARD": ("reshard_after_forward", loop.fsdp.reshard_after_forward),
              "FSDP_OFFLOAD_PARAMS": ("cpu_offload", loop.fsdp.cpu_offload),
              "FSDP_ACTIVATION_CHECKPOINTING": ("activation_checkpointing", loop.fsdp.activation_checkpointing)}  # fmt: skip
    for variable, (key, ours) in wanted.items():
        if variable not in env:
            continue
        theirs = env[variable].lower() in ("true", "1", "full_shard")
        if theirs != ours:
            raise ValueError(f"the accelerate launch config has {variable.lower()}={env[variable]} but the run has "
                             f"train.fsdp.{key}={str(ours).lower()}: make them agree")  # fmt: skip


# ============================================================================ sharding
@dataclass
class ShardedTrainable:
    """The sharded module and where each trainable parameter lives in it (trainable name -> name in ``module``)."""

    module: torch.nn.Module
    names: dict[str, str]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters (now sharded DTensors) under the trainer's names."""
        params = dict(self.module.named_parameters())
        return {name: params[fqn] for name, fqn in self.names.items()}

    def reshard(self) -> None:
        """Free every gathered block (local). After a forward that kept weights gathered (a root, or
        ``reshard_after_forward: false``), so that writes to the shards (EMA swaps, loads) are what runs next."""
        from torch.distributed.fsdp import FSDPModule

        for sub in self.module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()

    # ------------------------------------------------------------------ full state (collectives)
    def full_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable weights, gathered in full on the CPU of the main process (empty elsewhere). All processes call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module, options=_full_state_options(cpu_offload=True, ignore_frozen_params=True))
        return {name: state[fqn] for name, fqn in self.names.items() if fqn in state}

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every process passes the same full tensors; each keeps its own shard."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = {self.names[name]: value for name, value in tensors.items()}
        set_model_state_dict(self.module, state, options=_full_state_options(strict=False))

    def full_optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """``{"state": {name: {...}}, "param_groups": [{..., "params": [names]}]}`` in full, on the main process."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.module, optimizer,
                                         options=_full_state_options(cpu_offload=True, ignore_frozen_params=True))  # fmt: skip
        if not state:
            return {}
        to_name = {fqn: name for name, fqn in self.names.items()}
        return {"state": {to_name[fqn]: value for fqn, value in state["state"].items()},
                "param_groups": [{**g, "params": [to_name[f] for f in g["params"]]} for g in state["param_groups"]]}  # fmt: skip

    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {"state": {self.names[name]: value for name, value in state["state"].items()},
                 "param_groups": [{**g, "params": [self.names[n] for n in g["params"]]} for g in state["param_groups"]]}  # fmt: skip
        set_optimizer_state_dict(self.module, optimizer, state, options=_full_state_options())

    @contextlib.contextmanager
    def unsharded_on_main(self, is_main: bool) -> Iterator[None]:
        """For writing the run's artifact: on the main process the module shows plain full weights and its own class.

        All processes gather (a collective); only the main process's module changes, and only
        until the block ends. Nothing may run the module meanwhile (its FSDP hooks would
        gather again); saving only reads ``state_dict()``, whose FSDP pre-hook does nothing
        when the module is already resharded, as it is between steps.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        self.reshard()
        full = get_model_state_dict(self.module, options=_full_state_options(cpu_offload=True))
        if not is_main:
            yield
            return
        swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        classes: list[tuple[torch.nn.Module, type]] = []
        try:
            for fqn, param in list(self.module.named_parameters()):
                owner_name, _, leaf = fqn.rpartition(".")
                owner = self.module.get_submodule(owner_name)
                swapped.append((owner, leaf, param))
                owner._parameters[leaf] = torch.nn.Parameter(full[fqn].to(param.dtype), requires_grad=param.requires_grad)
            for sub in self.module.modules():
                if isinstance(sub, FSDPModule):  # FSDP2 derives FSDP<Class>(FSDPModule, Class)
                    classes.append((sub, type(sub)))
                    sub.__class__ = next(c for c in type(sub).__mro__[1:] if not issubclass(c, FSDPModule))
            yield
        finally:
            for sub, cls in classes:
                sub.__class__ = cls
            for owner, leaf, param in swapped:
                owner._parameters[leaf] = param


def _ensure_process_group(device: torch.device) -> None:
    """FSDP on one process (CPU offload on a single GPU) still needs a (one-member) process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def sharding_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to shard one by one (see the module docstring), outermost first, never one inside another."""
    units: list[torch.nn.Module] = []
    for attr in BLOCK_LISTS:
        blocks = getattr(module, attr, None)
        if isinstance(blocks, torch.nn.ModuleList):
            units.extend(blocks)
        elif isinstance(blocks, torch.nn.Module):
            units.append(blocks)
    if not units:
        names = set(getattr(module, "_no_split_modules", None) or [])
        for sub in module.modules():
            if sub is not module and type(sub).__name__ in names and not any(_contains(u, sub) for u in units):
                units.append(sub)
    return units


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _checkpoint_forward(block: torch.nn.Module) -> None:
    """Recompute ``block`` in backward, keeping its parameter names (its ``forward`` is wrapped, not the module).

    FSDP's hooks stay on the block's ``__call__``, outside the checkpoint, as with torchtitan's
    ``checkpoint_wrapper`` then ``fully_shard``: the pre-backward hook gathers the block's
    weights before the recomputation needs them.
    """
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def shard_trainable(module: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], loop: LoopConfig,
                    device: torch.device) -> ShardedTrainable:  # fmt: skip
    """``fully_shard`` each block of ``module`` and then ``module``; the trainable parameters must all live in it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    where = {id(p): fqn for fqn, p in module.named_parameters()}
    outside = [name for name, p in trainable.items() if id(p) not in where]
    if outside:
        raise ValueError(f"train.distributed=fsdp: trainable parameters outside the sharded module ({outside[:3]}); "
                         "the method's Trainee.trainable_module() must hold every trainable weight")  # fmt: skip
    names = {name: where[id(p)] for name, p in trainable.items()}
    _ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if loop.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if loop.fsdp.cpu_offload else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for block in sharding_units(module):
        if loop.fsdp.activation_checkpointing:
            _checkpoint_forward(block)
        fully_shard(block, reshard_after_forward=loop.fsdp.reshard_after_forward, **options)
    # The root too frees its gathered weights after forward (torch's default keeps them): a few small
    # tensors re-gathered in backward, and no gathered copy can outlive a write to the shards.
    fully_shard(module, reshard_after_forward=loop.fsdp.reshard_after_forward, **options)
    return ShardedTrainable(module, names)


def full_tensor(value: Any) -> Any:
    """A DTensor gathered in full (a collective: every process calls it), anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` distributed as ``like`` is (a DTensor's placements), or ``full`` on ``like``'s device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device_mesh.device_type, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device, like.dtype)


__all__ = ["BLOCK_LISTS", "ShardedTrainable", "check_launch_config", "full_tensor", "shard_like", "shard_trainable",
           "sharding_units"]  # fmt: skip
