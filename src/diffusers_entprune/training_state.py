"""Physical pruning in the middle of training: the model, its optimizer and its EMA move together.

`EntPrunedTransformer2DModel.prune_blocks` keeps the module (and parameter) identity of every kept block, so the
optimizer's per-parameter state (AdamW moments, step counts) and the EMA copies of kept parameters stay valid;
only the entries of the removed parameters must go. Under several processes, DistributedDataParallel has bucketed
the old parameter list, so the model is wrapped again (`reprepare_model`).
"""

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

