"""FSDP2 sharding of the distillation models (``distill.sharding: fsdp``), activation checkpointing, and the
helpers a sharded run needs: an EMA on local shards, sharded checkpoints, full state dicts for export, per-rank
parameter bytes.

Plain PyTorch (no Ray): ``hiar.methods.distill`` calls these; ``hiar/jobs/train.py`` runs them under Ray Train's
``TorchTrainer`` (gloo on CPU, NCCL on GPUs).

* :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every ``model.blocks[i]`` and then to the
  root (the root group holds the patch/condition embedders and the output head).  Each parameter becomes a
  ``DTensor`` sharded on dim 0 over the mesh, so a rank holds ~1/world of every model it shards.
* The generator is called many times per training step (one call per block and denoising step, most of them under
  ``no_grad``) before one backward: FSDP2 all-gathers each block for every call and, with
  ``reshard_after_forward=True`` (the default here), frees the gathered parameters right after each call;
  the backward re-gathers them.  No-grad calls register no backward hooks.
* Mixed precision (:func:`mixed_precision_policy`): on CUDA with ``distill.mixed_precision`` ``auto``/``bf16`` the
  compute copies are bf16 and gradients are reduced in fp32; the sharded parameters, the optimiser state and the
  EMA stay fp32.  On the CPU everything is fp32 (no policy).
* Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) are ``torch.distributed.checkpoint`` directories
  for ``ddp`` and ``fsdp`` alike: each rank writes what it holds, nothing is gathered on one rank, and a
  checkpoint loads into any worker count and either sharding (DCP reshards by the global shapes in its
  ``.metadata``).  Only the final export gathers the EMA generator whole on rank 0 (:func:`full_state_dict`).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# DCP warns on every single-process save/load that it assumes a single process: that is what no_dist says
warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")

REAL_SCORE_SHARDING = ("shard", "replicate")


# ---------------------------------------------------------------------- deciding
def fsdp_enabled(cfg, world_size: int) -> bool:
    """True when the models are to be sharded: ``distill.sharding == "fsdp"`` and more than one worker.

    ``fsdp`` with one worker warns and runs unsharded (there is nothing to shard over); the result is the
    ``ddp`` path with one worker, bit for bit.
    """
    if cfg.distill.sharding != "fsdp":
        return False
    if world_size <= 1:
        warnings.warn("distill.sharding=fsdp with one worker: nothing to shard over, running unsharded "
                      "(identical to sharding=ddp with one worker)", stacklevel=2)
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"distill.sharding=fsdp with {world_size} workers needs an initialised process group "
                           "(Ray Train's TorchTrainer sets it up)")
    return True


def device_mesh(device: torch.device, world_size: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def mixed_precision_policy(cfg, device: torch.device):
    """``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` on a bf16-capable GPU when
    ``distill.mixed_precision`` is ``auto`` or ``bf16``; None (fp32 throughout) otherwise, and always on the CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mode = cfg.distill.mixed_precision
    if device.type == "cuda" and mode in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


# ---------------------------------------------------------------------- sharding and checkpointing
def shard_model(model: torch.nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the root (in place; returns ``model``)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks to shard per block")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # The root returns a view (the unpatchify reshapes); FSDP2 warns that an in-place op on it would skip the
    # pre-backward hook. Nothing here modifies a model output in place (GuidedVelocity, the losses: out of place).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCausalWanTransformer3DModel\) returned a view")
    return model


def activation_checkpointing(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    """Per-block activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``).

    The model's forward already wraps each ``blocks[i]`` call in ``_gradient_checkpointing_func`` when
    ``gradient_checkpointing`` is set and grad is enabled; diffusers' ``enable_gradient_checkpointing`` installs the
    non-reentrant ``torch.utils.checkpoint.checkpoint``.  No-grad calls (most of the rollout) are not checkpointed.
    """
    if on:
        model.enable_gradient_checkpointing()
    elif getattr(model, "gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards of sharded parameters, whole unsharded ones)."""
    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------- EMA on shards
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` parameter by parameter, on local shards when sharded.

    The EMA is a copy of the generator made before sharding and sharded the same way, so its local shards line
    up with the generator's; it stays fp32 and never runs forward while sharded.
    """
    with torch.no_grad():
        e = [local_tensor(p) for p in ema.parameters()]
        w = [local_tensor(p) for p in model.parameters()]
        for a, b in zip(e, w):
            if a.shape != b.shape:
                raise RuntimeError(f"EMA shard {tuple(a.shape)} does not match the generator's {tuple(b.shape)}")
            a.lerp_(b.to(a.dtype), 1.0 - decay)


# ---------------------------------------------------------------------- state dicts
def full_state_dict(model: torch.nn.Module, rank0_only: bool = True) -> dict:
    """The whole (unsharded) state dict on the CPU. Collective for a sharded model: every rank must call it.
    With ``rank0_only`` only rank 0 gets the tensors (others get ``{}``); otherwise every rank does."""
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Gathered parameter by parameter in state-dict order (the same on every rank). Measured here:
    # get_model_state_dict(full_state_dict=True, cpu_offload=True) on a module that has not run forward since
    # set_model_state_dict returned DTensors on rank 0.
    from torch.distributed.tensor import DTensor

    keep = not rank0_only or dist.get_rank() == 0
    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.detach().cpu().clone()
    return out


def unsharded_copy(skeleton: torch.nn.Module, state: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A plain module with ``skeleton``'s structure (a meta-device copy of the model before sharding) holding
    ``state`` (a full state dict)."""
    import copy

    model = copy.deepcopy(skeleton).to_empty(device=device)
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------- sharded checkpoints
TRAINER_STATE = "trainer.json"  # a checkpoint's counters and the run that wrote it (rank 0, next to DCP's .metadata)


def _checkpoint_state(models: dict, optimizers: dict) -> dict:
    """``{name: model state dict}`` and ``{name: optimiser state dict keyed by parameter name}``: local shards
    (DTensors) of sharded models, whole tensors of unsharded ones. Collective for sharded models."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {name: get_model_state_dict(model) for name, model in models.items()}
    for name, (model, opt) in optimizers.items():
        # an optimiser that has not stepped yet gets its state initialised here (a zero-lr step), so a fresh
        # trainer has the tensors that the load fills in
        state[name] = get_optimizer_state_dict(model, opt)
    return state


def save_checkpoint(path, models: dict, optimizers: dict, counters: dict) -> None:
    """Save models and optimisers with ``torch.distributed.checkpoint`` (collective: every rank calls it).

    Each rank writes only what it holds (its shards; for unsharded data-parallel models DCP spreads the
    replicated tensors over the ranks, each written once) to ``path``, which may be a directory of its own on
    each rank: Ray Train merges the ranks' directories of one report into one checkpoint. Rank 0 also writes DCP's
    ``.metadata`` (every tensor's global shape and where its pieces are) and ``trainer.json`` (``counters``).
    The layout is independent of the worker count: :func:`load_checkpoint` reshards on load.
    """
    import json
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    single = not (dist.is_available() and dist.is_initialized())
    dcp.save(_checkpoint_state(models, optimizers), checkpoint_id=str(path), no_dist=single)
    if single or dist.get_rank() == 0:
        (Path(path) / TRAINER_STATE).write_text(json.dumps(counters, sort_keys=True))


def read_counters(path) -> dict:
    import json
    from pathlib import Path

    file = Path(path) / TRAINER_STATE
    if not file.exists():
        raise ValueError(f"{path} is not a training checkpoint of this version (no {TRAINER_STATE}; checkpoints "
                         "are torch.distributed.checkpoint directories since sharded training)")
    return json.loads(file.read_text())


def check_checkpoint_shapes(path, models: dict) -> None:
    """Every parameter of ``models`` is in the checkpoint at ``path`` with the same (global) shape; otherwise a
    ValueError naming the first differences. Reads DCP's ``.metadata`` only (no tensors)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except FileNotFoundError as err:
        raise ValueError(f"{path} holds no torch.distributed.checkpoint (.metadata missing)") from err
    problems = []
    for name, model in models.items():
        for key, value in model.state_dict().items():  # DTensor.shape is the global shape
            meta = saved.get(f"{name}.{key}")
            if meta is None:
                problems.append(f"{name}.{key} is missing")
            elif tuple(getattr(meta, "size", ())) != tuple(value.shape):
                problems.append(f"{name}.{key} is {list(meta.size)} there, {list(value.shape)} here")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"checkpoint {path} was written for another model: " + "; ".join(problems[:3]) + more
                         + " -- its model.* settings differ from this config's")


def check_checkpoint(path, models: dict, stage: str | None = None) -> dict:
    """A checkpoint's counters, after checking its stage (when given) and that every parameter of ``models`` is in
    it with the same shape; reads ``trainer.json`` and ``.metadata`` only (``models`` may live on the meta device)."""
    counters = read_counters(path)
    if stage is not None and counters.get("stage") != stage:
        raise ValueError(f"checkpoint {path} is a {counters.get('stage')!r} checkpoint, not a {stage!r} one")
    check_checkpoint_shapes(path, models)
    return counters


def load_checkpoint(path, models: dict, optimizers: dict, stage: str | None = None) -> dict:
    """Load a :func:`save_checkpoint` directory into ``models`` and ``optimizers`` (collective), whatever the
    worker count and sharding it was written with; returns its counters. The stage (when given) and the shapes
    are checked first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    counters = check_checkpoint(path, models, stage)
    state = _checkpoint_state(models, optimizers)
    single = not (dist.is_available() and dist.is_initialized())
    dcp.load(state, checkpoint_id=str(path), no_dist=single)  # in place: each rank reads the pieces it holds
    for name, model in models.items():
        set_model_state_dict(model, state[name])
    for name, (model, opt) in optimizers.items():
        set_optimizer_state_dict(model, opt, state[name])
    return counters


def read_full_model(path, name: str) -> dict:
    """One model's whole state dict from a checkpoint, in this process (no process group): for checks and
    exports outside training."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{name}."
    state = {k[len(prefix):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in saved.items() if k.startswith(prefix) and hasattr(m, "size")}
    if not state:
        raise ValueError(f"checkpoint {path} holds no model {name!r}")
    dcp.load({name: state}, checkpoint_id=str(path), no_dist=True)
    return state


__all__ = ["REAL_SCORE_SHARDING", "fsdp_enabled", "device_mesh", "mixed_precision_policy", "shard_model",
           "activation_checkpointing", "is_sharded", "local_param_bytes", "ema_update", "full_state_dict",
           "unsharded_copy", "save_checkpoint", "load_checkpoint", "check_checkpoint", "read_counters",
           "check_checkpoint_shapes",
           "read_full_model", "TRAINER_STATE"]
