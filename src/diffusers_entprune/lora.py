"""LoRA fine-tuning of the kept blocks with peft, merged back into plain weights before export."""

# attention projections and the MLP of every DiT block (diffusers' BasicTransformerBlock names)
DIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def add_lora(model, rank: int = 16, alpha: float | None = None, target_modules=DIT_LORA_TARGETS):
    """Inject LoRA adapters into ``model``'s blocks in place and make only them trainable.

    The modules stay where they are, so block skipping and pruning work as without LoRA (a pruned block takes its
    adapters with it).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"`lora_rank` must be >= 1, got {rank}.")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model


def merge_lora(model):
    """Fold every LoRA adapter into its base layer and put the plain layer back (diffusers-loadable weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return len(layers)
