"""Several processes: the accelerator, and factmem's own FSDP2 path (sharding, lockstep, sharded
checkpoints, gathered Hugging Face weights).

Why factmem shards the model itself. `accelerate launch` with an FSDP config sets
ACCELERATE_USE_FSDP and FSDP_* in every process's environment. accelerate's own FSDP2 wrapping
needs the model and its optimizer prepared in one call, which does not fit stages that build a
new optimizer each time; and on a machine without a GPU accelerate falls back to DDP (or, with
its default launcher, to lone processes) instead of FSDP. So factmem reads those settings and
calls `torch.distributed.fsdp.fully_shard` on the decoder layers and the root, on GPUs (NCCL)
and CPU processes (gloo) alike: the code the CPU tests run is the code a GPU cluster runs.

Rules every FSDP caller here follows: each forward pass is a collective (all ranks make the
same calls in the same order, see `pad_micro_batches`); each save or load of weights is one too.

On-disk formats under FSDP (nothing pickled; tensors as safetensors, everything else JSON):
- sharded (in-stage checkpoints, `resume/final`): `torch.distributed.checkpoint` with its
  Hugging Face storage, one `shard-0000R-model-00001-of-00001.safetensors` per rank whose header
  holds the shard's offsets (JSON). Readable with another process count, or with plain tensors.
- gathered (analysis checkpoints, the EWC Fisher): gathered one tensor at a time, written by
  rank 0 in files of at most `MAX_SHARD_BYTES`, as Hugging Face's `save_pretrained` lays them out.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factmem.errors import FactmemError

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 2**30  # per gathered safetensors file, as save_pretrained's default


# --------------------------------------------------------------------------------------------
# Processes


def make_accelerator():
    """accelerate's Accelerator. Processes started by a launcher (WORLD_SIZE > 1) on a machine
    without a GPU join one gloo group: left alone, accelerate gives each of them a world of its
    own there (DistributedType.NO) and every process would write the run directory."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=True) if launched and not torch.cuda.is_available() else Accelerator()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (JSON-able data only)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [json.dumps(obj) if rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return json.loads(box[0])


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is true on any (a decision all ranks must take together)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------------------------
# FSDP settings (from the accelerate config, via the environment `accelerate launch` sets)


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool
    layer_classes: tuple[str, ...]  # empty: the model's own `_no_split_modules`


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def fsdp_settings() -> FsdpSettings | None:
    """The FSDP settings of this launch, None without FSDP. Settings factmem's FSDP path does
    not implement are refused (one line naming the accelerate config key), not ignored."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return None

    def refuse(key: str, value: str, fix: str) -> FactmemError:
        return FactmemError(f"accelerate config: fsdp_config.{key}: {value} is not supported by "
                            f"factmem's FSDP path; {fix}")

    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise refuse("fsdp_version", version, "set fsdp_version: 2 (FSDP2, fully_shard)")
    ram = ("set it to false (every process loads the model on CPU once, then shards it: "
           "16 GB of host memory per process for an 8B model in bfloat16)")
    for key, fix in (("offload_params", "set it to false (weights stay on the GPUs)"),
                     ("activation_checkpointing", "set it to false"),
                     ("cpu_ram_efficient_loading", ram)):
        if _env_flag(f"FSDP_{key.upper()}"):
            raise refuse(f"fsdp_{key}", "true", fix)
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise refuse("fsdp_auto_wrap_policy", policy,
                     "use TRANSFORMER_BASED_WRAP (decoder layers are the shard units)")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("no", ""):
        raise FactmemError(f"accelerate config: mixed_precision: {precision} is not supported "
                           "with factmem's FSDP path; set it to \"no\" (model.dtype: auto loads "
                           "bfloat16 weights on GPUs)")
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FsdpSettings(
        reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )


def check_fsdp_run(stages) -> FsdpSettings | None:
    """Refuse, before anything is written (and before accelerate reads the same settings),
    what factmem cannot run under FSDP."""
    settings = fsdp_settings()
    if settings is None:
        return None
    if "WORLD_SIZE" not in os.environ:
        raise FactmemError("FSDP is configured (ACCELERATE_USE_FSDP) but this process was not "
                           "started by a launcher: use accelerate launch --config_file ...")
    for st in stages:
        if st.lora is not None:  # adapter weights added after sharding would not be sharded
            raise FactmemError(f"stages.{st.name}.lora: LoRA stages are not supported under "
                               "FSDP; run them without FSDP (one process or DDP)")
    return settings


# --------------------------------------------------------------------------------------------
# Sharding


_MESH: Any = None


def _mesh(device: torch.device):
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh

        _MESH = init_device_mesh(device.type, (world_size(),))
    return _MESH


def shard(model, settings: FsdpSettings, device: torch.device) -> int:
    """FSDP2 in place: every decoder layer (the model's `_no_split_modules`, or the configured
    class names) is a shard unit, the rest (embeddings, final norm, head) goes with the root.
    Returns the number of layers sharded."""
    from torch.distributed.fsdp import fully_shard

    names = set(settings.layer_classes or (getattr(model, "_no_split_modules", None) or ()))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise FactmemError(f"FSDP: no module of {type(model).__name__} is a decoder layer "
                           f"({', '.join(sorted(names)) or 'the model names none'}); set "
                           "fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    mesh = _mesh(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    # With reshard_after_forward false (or torch's default for a root), FSDP2 keeps parameters
    # gathered after a forward pass, for the backward pass. After an evaluation none follows,
    # and the module would go on showing whole tensors where the optimizer, the regularizers
    # and the checkpoints expect its shards.
    model.register_forward_hook(_reshard_after_evaluation)
    return len(layers)


def _reshard_after_evaluation(module, args: Any, output: Any) -> None:
    if not torch.is_grad_enabled():
        for m in module.modules():  # each shard unit gathers and reshards its own parameters
            if hasattr(m, "reshard"):
                m.reshard()


def prepare_model(model, accelerator):
    """The model as the stages train it: sharded under FSDP, else `accelerator.prepare`d."""
    settings = fsdp_settings()
    if settings is None:
        return accelerator.prepare(model)
    if is_sharded(model):
        return model
    layers = shard(model, settings, accelerator.device)
    log.info("FSDP: %d decoder layers + the root sharded over %d processes (%s)", layers,
             world_size(), accelerator.device.type)
    return model


def prepare_training(accelerator, optimizer, scheduler):
    """Optimizer and scheduler as the loop uses them. Under FSDP both stay plain: accelerate's
    optimizer wrapper expects its own FSDP2 preparation. The scheduler stays plain with any
    process count: accelerate's wrapper steps it once per process at every optimizer step
    (it assumes each process brought a batch of its own; factmem splits one global batch)."""
    if is_sharded_run():
        return optimizer, scheduler
    return accelerator.prepare(optimizer), scheduler


def is_sharded_run() -> bool:
    return _env_flag("ACCELERATE_USE_FSDP") and torch.distributed.is_initialized()


def is_sharded(model) -> bool:
    """Whether `model` holds FSDP-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (differentiable); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def no_sync(accelerator, model, skip: bool) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally when `skip` (all but the last one).
    FSDP2 modules are told so directly, on CPU and GPU alike (accelerate only does it when its
    own FSDP2 preparation ran)."""
    if not skip:
        yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with accelerator.no_sync(model) if accelerator.num_processes > 1 else nullcontext():
        yield


def pad_micro_batches(micro: list[list[int]], batch: list[int], world: int,
                      parts: int) -> list[list[int]]:
    """Under FSDP every forward and backward pass is a collective, so every rank must run as
    many as the busiest rank (rank 0, whose share `batch[0::world]` is the largest). Returns
    `micro` followed by padding passes on `batch[:1]`, which the caller weights by zero."""
    from factmem.train.batching import split_micro

    target = len(split_micro(batch[0::world], parts))
    return micro + [batch[:1]] * (target - len(micro))


# --------------------------------------------------------------------------------------------
# State: unique tensors, RNG per rank


def model_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state dict without tied duplicates (lm_head sharing the embeddings is kept
    once, under the first name, as save_pretrained does); DTensors under FSDP."""
    kept = {n for n, _ in model.named_parameters()}  # a shared parameter under its first name
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: t for n, t in model.state_dict().items() if n in kept or n not in every}


def host_rng_state() -> dict[str, Any]:
    """Python's and NumPy's RNG states as JSON."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_host_rng_state(s: dict[str, Any]) -> None:
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON (python, numpy, torch CPU and, where present, CUDA)."""
    out: dict[str, Any] = {**host_rng_state(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    set_host_rng_state(s)
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint, safetensors storage)


def save_sharded(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every rank writes its shards of `tensors` under `path` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))


def load_sharded(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Fill `tensors` (DTensors: this rank's shards; plain tensors: whole) from `path`, in place
    (a collective when several processes run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))


def is_sharded_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("shard-*.safetensors"))


def optimizer_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW state keyed by parameter name: (tensors `NAME.exp_avg` ..., the rest as JSON)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}.{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(model, optimizer, path: Path, rest: dict[str, Any]) -> None:
    """Restore what `optimizer_state` saved (tensors from the sharded directory `path`)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # The template comes from the optimizer itself (torch initialises an empty AdamW state
    # with a zero-lr step, which leaves the weights as they are), so shards land where they go.
    tensors, _ = optimizer_state(model, optimizer)
    load_sharded(tensors, path)
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    for fqn, st in rest["scalars"].items():
        state.setdefault(fqn, {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in rest["param_groups"]]
    # set_optimizer_state_dict reads the state like a loaded checkpoint (plain dicts)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------
# Gathered weights: a Hugging Face directory written by rank 0, one tensor gathered at a time


def _plan_files(sizes: dict[str, int], limit: int) -> list[list[str]]:
    files: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if files[-1] and used + n > limit:
            files.append([])
            used = 0
        files[-1].append(name)
        used += n
    return files


def save_gathered(tensors: dict[str, torch.Tensor], dir: Path, stem: str = "model",
                  metadata: dict[str, str] | None = None,
                  limit: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` (DTensors or plain) whole, as `stem.safetensors` or, past `limit` bytes,
    `stem-0000i-of-0000n.safetensors` + `stem.safetensors.index.json` (save_pretrained's
    layout). Every rank takes part in each gather; rank 0 holds at most one file's worth and
    writes. Returns the file names."""
    from safetensors.torch import save_file

    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    plan = _plan_files(sizes, limit)
    names = ([f"{stem}.safetensors"] if len(plan) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    main = rank() == 0
    if main:
        dir.mkdir(parents=True, exist_ok=True)
    for fname, keys in zip(names, plan):
        buf = {}
        for key in keys:
            whole = full(tensors[key]).detach()
            if main:
                buf[key] = whole.to("cpu", copy=True).contiguous()
            del whole
        if main:  # a temporary name, renamed: no half-written file under the final name
            tmp = dir / f".{fname}.tmp"
            save_file(buf, str(tmp), metadata={"format": "pt", **(metadata or {})})
            os.replace(tmp, dir / fname)
        del buf
    if main and len(plan) > 1:
        from factmem import files

        files.write_json(dir / f"{stem}.safetensors.index.json",
                      {"metadata": {"total_size": sum(sizes.values())},
                       "weight_map": {k: f for f, keys in zip(names, plan) for k in keys}})
    return names


def save_pretrained_gathered(model, tokenizer, dir: Path) -> None:
    """A Hugging Face model directory (config, generation config, weights, tokenizer) from a
    sharded model, written by rank 0 into `dir` (which must not be in use)."""
    save_gathered(model_tensors(model), dir)
    if rank() == 0:
        model.config.save_pretrained(dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(dir)
        tokenizer.save_pretrained(dir)


# --------------------------------------------------------------------------------------------
# Regularizers under FSDP


def frozen_copy(model):
    """A frozen copy of a sharded model, sharded the same way: built on the meta device from
    the model's config, sharded, then filled shard by shard from the model's own (no gather;
    FSDP modules cannot be deep-copied)."""
    from transformers import AutoModelForCausalLM

    settings = fsdp_settings() or FsdpSettings(True, ())
    params = list(model.parameters())
    device = local(params[0]).device
    config = model.config
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(
            config, dtype=params[0].dtype, attn_implementation=config._attn_implementation,
            trust_remote_code=bool(getattr(config, "auto_map", None)))
    shard(copy, settings, device)
    copy.to_empty(device=device)
    source = model.state_dict()
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, t in copy.state_dict().items():
            local(t).copy_(local(source[name]))
        for name, b in copy.named_buffers():  # non-persistent ones (rotary tables) included
            b.copy_(buffers[name])
    copy.requires_grad_(False)
    return copy.eval()


def backward_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d loss / d params for a sharded model: FSDP reduces gradients in its backward hooks, so
    `torch.autograd.grad` cannot see them. Every rank must pass the same loss (FSDP averages
    the ranks' gradients: equal ones come back unchanged). The parameters' `.grad` must be
    empty before and is emptied after."""
    loss.backward()
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def global_sum(value: torch.Tensor) -> float:
    """Sum over ranks of a per-rank partial value (e.g. a penalty over local shards)."""
    v = value.detach().reshape(1).to(torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(v)
    return float(v.item())
