"""Physical pruning in the middle of training: the model, its optimizer and its EMA move together.

`EntPrunedTransformer2DModel.prune_blocks` keeps the module (and parameter) identity of every kept block, so the
optimizer's per-parameter state (AdamW moments, step counts) and the EMA copies of kept parameters stay valid;
only the entries of the removed parameters must go. Under several processes, DistributedDataParallel has bucketed
the old parameter list, so the model is wrapped again (`reprepare_model`).
"""

import logging

from .models.entpruned_transformer_2d import EntPrunedTransformer2DModel


def _base_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer keeps the torch optimizer in `.optimizer`
    return getattr(optimizer, "optimizer", optimizer)


def prune_training_state(model: EntPrunedTransformer2DModel, blocks, optimizer=None, ema=None) -> list[int]:
    """Remove ``blocks`` (original indices) from ``model`` and the matching entries from ``optimizer`` and ``ema``.

    Args:
        model: the unwrapped model (``accelerator.unwrap_model(model)``).
        optimizer: a torch optimizer (or accelerate's wrapper) over some of ``model``'s parameters.
        ema: a diffusers `EMAModel` built over the model's trainable parameters, in ``model.parameters()`` order
            (all of them, or only the adapters when the rest is frozen as with LoRA).

    Returns the removed block indices. The kept parameters' optimizer moments and EMA weights are untouched.
    """
    before = list(model.parameters())
    removed = model.prune_blocks(blocks)
    # Follow the pruned model's own parameter order: optimizer and EMA state are saved and loaded by position, and
    # a resumed run builds them from the pruned model. (Pruning block 0 moves the shared embedder's first mention.)
    after = list(model.parameters())
    kept_ids = {id(p) for p in after}

    if optimizer is not None:
        base = _base_optimizer(optimizer)
        for group in base.param_groups:
            gone = [p for p in group["params"] if id(p) not in kept_ids]
            in_group = {id(p) for p in group["params"]}
            group["params"] = [p for p in after if id(p) in in_group]
            for p in gone:
                base.state.pop(p, None)
    if ema is not None:
        tracked_before = [p for p in before if p.requires_grad]
        tracked_after = [p for p in after if p.requires_grad]
        if len(ema.shadow_params) != len(tracked_before):
            raise ValueError(f"The EMA tracks {len(ema.shadow_params)} tensors but the model had "
                             f"{len(tracked_before)} trainable parameters; build it as "
                             "`EMAModel([p for p in model.parameters() if p.requires_grad])`.")
        shadow = {id(p): s for p, s in zip(tracked_before, ema.shadow_params)}
        ema.shadow_params = [shadow[id(p)] for p in tracked_after]
        if getattr(ema, "temp_stored_params", None) is not None:
            stored = {id(p): s for p, s in zip(tracked_before, ema.temp_stored_params)}
            ema.temp_stored_params = [stored[id(p)] for p in tracked_after]
    return removed


def reprepare_model(accelerator, wrapped_model, module):
    """After pruning, give accelerate a model wrapper that knows the new parameter list.

    With one process the prepared model is the module itself and nothing changes. With several, the old
    DistributedDataParallel wrapper still reduces the removed parameters' buckets, so it is dropped from the
    accelerator's list of prepared models (accelerate keeps that list for `save_state`) and the module is prepared
    again, with its mixed-precision forward restored first so autocast is not applied twice.
    """
    if wrapped_model is module:
        return module
    # accelerate has no public API to replace a prepared model; its `_models` list feeds save_state/load_state
    accelerator._models = [m for m in accelerator._models if m is not wrapped_model]
    module.__dict__.pop("forward", None)  # accelerate's autocast patch is an instance attribute
    module.__dict__.pop("_original_forward", None)
    return accelerator.prepare_model(module)


def nonfinite_training_state(model, optimizer=None, ema=None) -> list[str]:
    """What holds inf or NaN among ``model``'s trainable weights, their optimizer state and their EMA weights
    (empty: all finite). A finite loss does not rule it out: the gradient or the update itself can overflow, and a
    checkpoint of such a state would resume straight into the divergence. One host sync per device."""
    import torch

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    named = [(f"weight {name}", p.detach()) for name, p in params]
    if optimizer is not None:
        state = _base_optimizer(optimizer).state
        named += [(f"optimizer state {key!r} of {name}", value) for name, p in params
                  for key, value in state.get(p, {}).items() if torch.is_tensor(value) and value.is_floating_point()]
    if ema is not None:  # the EMA's shadows follow the trainable parameters' order (see prune_training_state)
        named += [(f"EMA weight of {name}", shadow) for (name, _), shadow in zip(params, ema.shadow_params)]
    finite = {}
    for device in {t.device for _, t in named}:  # AdamW keeps its step counts on the CPU
        group = [(name, t) for name, t in named if t.device == device]
        flags = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        finite.update(zip([name for name, _ in group], flags))
    return [name for name, _ in named if not finite[name]]


def set_base_learning_rate(lr_scheduler, learning_rate: float) -> None:
    """Run a restored schedule from ``learning_rate`` on: the schedule's saved state brings back the old base rate,
    which would silently ignore a new `--learning_rate` given on resume. For the `LambdaLR` schedules diffusers'
    `get_scheduler` builds (every one of them), under accelerate's wrapper or not."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def check_processes_agree(accelerator, model) -> None:
    """Every process must end with the same blocks and weights: pruning re-wraps DDP mid-training, and a process
    that had stopped receiving its peers' gradients would drift silently. A no-op with one process."""
    import torch

    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        summary = torch.tensor([float(model.num_blocks)] + [p.double().sum().item() for p in model.parameters()],
                               dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(summary[None]).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError("The processes ended with different weights or blocks; the model was not kept in sync "
                           "across processes. Please report this with your accelerate configuration.")
    logging.getLogger(__name__).info(f"Blocks and weights agree across {accelerator.num_processes} processes.")
