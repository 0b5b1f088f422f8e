"""`EntPrunedTransformer2DModel`: a diffusers DiT whose transformer blocks can be skipped, pruned and exported.

Block indices in this API are always indices in the *original* (unpruned) model, so that scores, decisions and
reports keep one numbering however many blocks have already gone. `kept_block_indices` maps each block still in
`transformer_blocks` to its original index.

Policies (see README, "Pruning policies"):

- Timestep/label embedder copies. diffusers gives every block its own copy of DiT's single conditioning embedder,
  and the final layer reads block 0's copy. By default (``embedder_copies="tie"``) the copies must be identical
  (they are in every converted or DiT-trained checkpoint) and are tied into one shared module, as in the original
  DiT: fine-tuning updates one embedder, and pruning any block, block 0 included, cannot change what the final
  layer is conditioned on. Exports write identical copies again. ``"tie_to_first"`` ties diverged copies to block
  0's (changing the other blocks' conditioning; a warning gives the size of the change). ``"keep"`` leaves them
  independent; pruning block 0 is then refused, because the exported final layer would read another embedder.
- Label dropout. diffusers drops labels independently in every block's embedder in train mode; the original DiT
  drops once per sample. We disable the per-block dropout; the training loop drops labels once per sample with
  `drop_class_labels` (null class = ``num_embeds_ada_norm``, which `DiTPipeline` uses for guidance).
"""

import contextlib
import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)

EMBEDDER_POLICIES = ("tie", "tie_to_first", "keep")
# Config classes whose weights are DiT-format transformers. `Transformer2DModel` is the legacy name used by
# `facebook/DiT-XL-2-256`; diffusers maps it to `DiTTransformer2DModel` for patched ada_norm_zero configs.
DIT_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel", "EntPrunedTransformer2DModel")
KEPT_INDICES_KEY = "_entprune_kept_block_indices"
ORIGINAL_LAYERS_KEY = "_entprune_original_num_layers"


class EntPrunedTransformer2DModel(DiTTransformer2DModel):
    """A `DiTTransformer2DModel` that can skip blocks (identity, reversible) and prune them (physically).

    Load it with `from_pretrained` or wrap a model with `from_transformer`; both tie the embedder copies (see the
    module docstring). Constructed directly from a config, its freshly initialised blocks hold independent embedder
    copies and the ``"keep"`` policy applies.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Weights are not loaded yet (from_pretrained fills them in later), so nothing can be tied here.
        self._init_pruning_state("keep")

    # diffusers reads the accepted config keys from the signature of `__init__`: expose DiT's.
    __init__.__signature__ = inspect.signature(DiTTransformer2DModel.__init__)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, embedder_copies: str = "tie", **kwargs):
        """Load a DiT-format transformer (a diffusers folder or Hub id, usually with ``subfolder="transformer"``).

        Unlike plain diffusers, weights that do not match the config (missing or unexpected blocks) are refused.
        """
        _check_embedder_policy(embedder_copies)
        load_kwargs = {k: kwargs[k] for k in ("subfolder", "cache_dir", "revision", "token", "local_files_only",
                                               "force_download", "proxies") if k in kwargs}
        try:
            config = cls.load_config(pretrained_model_name_or_path, **load_kwargs)
        except OSError as error:
            from ..model_types import load_error

            subfolder = load_kwargs.get("subfolder")
            raise load_error("pretrained_model_name_or_path", str(pretrained_model_name_or_path), error,
                             f"a DiT transformer{f' (in its {subfolder!r} subfolder)' if subfolder else ''}",
                             "" if subfolder else " (for a pipeline folder, pass `subfolder='transformer'`)"
                             ) from error
        check_dit_config(config, argument="pretrained_model_name_or_path", source=str(pretrained_model_name_or_path))
        kwargs.pop("output_loading_info", None)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except OSError as error:
            if "Unable to load weights" not in str(error):
                raise
            raise OSError(f"`pretrained_model_name_or_path`={pretrained_model_name_or_path!r}: the weights file "
                          "cannot be read; it is truncated or corrupted (an interrupted copy or download?). "
                          f"Re-download or re-export it. ({error})") from error
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            summary = "; ".join(f"{k}: {sorted(v)[:4]}{' ...' if len(v) > 4 else ''}" for k, v in problems.items())
            raise ValueError(
                f"`pretrained_model_name_or_path`={pretrained_model_name_or_path!r}: the weights do not match the "
                f"config (num_layers={config.get('num_layers')}): {summary}. diffusers would silently drop or "
                "randomly initialise these blocks; fix the config's `num_layers` or the weights file."
            )
        model._init_pruning_state(embedder_copies)
        return model

    @classmethod
    def from_transformer(cls, transformer: DiTTransformer2DModel, embedder_copies: str = "tie"):
        """Wrap an existing `DiTTransformer2DModel` without copying its weights.

        The new model *shares* parameters and buffers with ``transformer``; use the returned model from then on.
        """
        _check_embedder_policy(embedder_copies)
        if isinstance(transformer, cls):
            raise TypeError("`transformer` is already an EntPrunedTransformer2DModel; use it directly.")
        if not isinstance(transformer, DiTTransformer2DModel):
            raise TypeError(
                f"`transformer` must be a diffusers DiTTransformer2DModel, got {type(transformer).__name__}. "
                "Load DiT/SiT checkpoints with "
                "EntPrunedTransformer2DModel.from_pretrained(path, subfolder='transformer')."
            )
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls.from_config(dict(transformer.config))
        model.load_state_dict(transformer.state_dict(keep_vars=True), strict=True, assign=True)
        _copy_buffers(transformer, model, clone=False)
        model.train(transformer.training)
        model._init_pruning_state(embedder_copies)
        return model

    def _init_pruning_state(self, embedder_copies: str):
        num_blocks = len(self.transformer_blocks)
        kept = self.config.get(KEPT_INDICES_KEY) or list(range(num_blocks))
        if len(kept) != num_blocks:
            raise ValueError(f"config key {KEPT_INDICES_KEY} lists {len(kept)} blocks but the model has {num_blocks}.")
        self.kept_block_indices = [int(i) for i in kept]
        self.original_num_layers = int(self.config.get(ORIGINAL_LAYERS_KEY) or num_blocks)
        self.embedder_copies = embedder_copies
        self.skipped_block_indices: set[int] = set()
        for block in self.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # label dropout happens once per sample instead
        if embedder_copies != "keep":
            self._tie_embedders(require_identical=embedder_copies == "tie")

    @torch.no_grad()
    def _tie_embedders(self, require_identical: bool):
        first = self.transformer_blocks[0].norm1.emb
        reference = first.state_dict()
        worst = 0.0
        for block in self.transformer_blocks[1:]:
            for name, value in block.norm1.emb.state_dict().items():
                worst = max(worst, (value.float() - reference[name].float()).abs().max().item())
        if worst > 0 and require_identical:
            raise ValueError(
                f"The blocks' timestep/label embedder copies differ (max abs difference {worst:.3g}), so they cannot "
                "be tied without changing the model. Pass `embedder_copies='tie_to_first'` to use block 0's copy "
                "everywhere (the one the final layer reads), or `embedder_copies='keep'` to keep them independent "
                "(block 0 then cannot be pruned)."
            )
        if worst > 0:
            logger.warning(f"Tying embedder copies to block 0's changes them by up to {worst:.3g} (abs).")
        for block in self.transformer_blocks:
            block.norm1.emb = first

    # ------------------------------------------------------------------ block bookkeeping

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    @property
    def pruned_block_indices(self) -> list[int]:
        kept = set(self.kept_block_indices)
        return [i for i in range(self.original_num_layers) if i not in kept]

    def parameter_counts(self) -> tuple[int, list[int]]:
        """Unique parameters outside the blocks (patch embedding, the shared conditioning embedder, final layer) and
        those each kept block owns alone; a pruned model has ``outside + sum(kept blocks)`` parameters."""
        owners: dict[int, set[int]] = {}
        for position, block in enumerate(self.transformer_blocks):
            for p in block.parameters():
                owners.setdefault(id(p), set()).add(position)
        sizes = {id(p): p.numel() for p in self.parameters()}
        per_block = [sum(sizes[i] for i, where in owners.items() if where == {position})
                     for position in range(self.num_blocks)]
        return sum(sizes.values()) - sum(per_block), per_block

    @property
    def null_class_label(self) -> int:
        """The label that means "no class" (classifier-free guidance); `DiTPipeline` uses it."""
        return int(self.config.num_embeds_ada_norm)

    def _validate_indices(self, indices: Iterable[int], argument: str) -> list[int]:
        if isinstance(indices, (int, str)) or not isinstance(indices, Iterable):
            raise TypeError(f"`{argument}` must be a list of block indices, got {indices!r}.")
        checked = []
        for i in indices:
            try:
                if isinstance(i, bool):
                    raise TypeError
                checked.append(operator.index(i))  # ints, numpy and 0-d torch integers (e.g. from an argsort)
            except TypeError:
                raise TypeError(f"`{argument}` must contain integers, got {i!r}.") from None
        indices = checked
        for i in indices:
            if not 0 <= i < self.original_num_layers:
                raise ValueError(f"`{argument}`: block {i} is out of range; the original model has blocks "
                                 f"0..{self.original_num_layers - 1}.")
            if i not in self.kept_block_indices:
                raise ValueError(f"`{argument}`: block {i} was already pruned; remaining blocks: "
                                 f"{self.kept_block_indices}.")
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        if duplicates:
            raise ValueError(f"`{argument}` lists blocks {duplicates} more than once.")
        return sorted(indices)

    # ------------------------------------------------------------------ skip (reversible) and prune (physical)

    def skip_blocks(self, indices: Iterable[int]) -> None:
        """Make these blocks (original indices) act as the identity on the residual stream, until changed.

        ``skip_blocks([])`` restores the full model. Weights are untouched; works with and without gradients.
        """
        indices = self._validate_indices(indices, "indices")
        if len(indices) == self.num_blocks:
            raise ValueError("`indices`: skipping every remaining block leaves no transformer block to run.")
        self.skipped_block_indices = set(indices)

    @contextlib.contextmanager
    def skipping(self, indices: Iterable[int]):
        """Context manager: skip ``indices`` inside the ``with`` block, then restore the previous skips of the blocks
        still in the model (a block pruned inside the block is gone, so it cannot stay skipped)."""
        previous = set(self.skipped_block_indices)
        self.skip_blocks(indices)
        try:
            yield self
        finally:
            self.skipped_block_indices = previous & set(self.kept_block_indices)

    def check_prunable(self, indices: Iterable[int], argument: str = "indices") -> list[int]:
        """The sorted indices if `prune_blocks` would accept them; else the error it would raise (naming
        ``argument``), without changing the model. For checking a request before any costly work."""
        indices = self._validate_indices(indices, argument)
        if len(indices) >= self.num_blocks:
            raise ValueError(f"`{argument}`: pruning {len(indices)} of {self.num_blocks} remaining blocks keeps zero "
                             "blocks; keep at least one.")
        if self.kept_block_indices[0] in indices and self.embedder_copies == "keep":
            raise ValueError(
                f"`{argument}`: cannot prune block {self.kept_block_indices[0]} with `embedder_copies='keep'`: the "
                "final layer reads the first block's embedder copy, which would change. Load the model with "
                "`embedder_copies='tie'` or 'tie_to_first'."
            )
        return indices

    def prune_blocks(self, indices: Iterable[int]) -> list[int]:
        """Remove these blocks (original indices) from `transformer_blocks`. Returns the removed indices.

        Kept blocks keep their module (and parameter) identity, so optimizer state and EMA weights keyed by
        parameter stay valid for them.
        """
        indices = self.check_prunable(indices)
        drop = set(indices)
        keep_positions = [p for p, i in enumerate(self.kept_block_indices) if i not in drop]
        self.transformer_blocks = nn.ModuleList([self.transformer_blocks[p] for p in keep_positions])
        self.kept_block_indices = [self.kept_block_indices[p] for p in keep_positions]
        self.skipped_block_indices -= drop
        self.register_to_config(num_layers=len(self.kept_block_indices), **self._pruning_config())
        return indices

    def _pruning_config(self) -> dict:
        return {KEPT_INDICES_KEY: list(self.kept_block_indices), ORIGINAL_LAYERS_KEY: self.original_num_layers}

    # ------------------------------------------------------------------ forward, in three reusable parts

    def embed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> patch tokens with positional embedding (N, L, D)."""
        return self.pos_embed(hidden_states)

    def run_blocks(self, hidden_states, timestep, class_labels, start: int = 0, end: int | None = None,
                   cross_attention_kwargs=None):
        """Run the non-skipped blocks at positions ``start`` to ``end`` (exclusive) of `transformer_blocks`."""
        for position in range(start, self.num_blocks if end is None else end):
            if self.kept_block_indices[position] in self.skipped_block_indices:
                continue
            block = self.transformer_blocks[position]
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, None, None, None, timestep, cross_attention_kwargs, class_labels
                )
            else:
                hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=None,
                                      encoder_attention_mask=None, timestep=timestep,
                                      cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
        return hidden_states

    def head(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        """Final adaLN layer and unpatchify: tokens (N, L, D) -> output (N, out_channels, H, W)."""
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)
        p, c = self.patch_size, self.out_channels
        side = int(hidden_states.shape[1] ** 0.5)
        hidden_states = hidden_states.reshape(-1, side, side, p, p, c)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        return hidden_states.reshape(-1, c, side * p, side * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] = None,
        return_dict: bool = True,
    ):
        tokens = self.embed(hidden_states)
        tokens = self.run_blocks(tokens, timestep, class_labels, cross_attention_kwargs=cross_attention_kwargs)
        output = self.head(tokens, timestep, class_labels)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    # ------------------------------------------------------------------ labels

    def drop_class_labels(self, class_labels: torch.Tensor, probability: float = 0.1, generator=None):
        """Classifier-free guidance dropout, once per sample: replace labels by the null class with ``probability``."""
        drop = torch.rand(class_labels.shape, generator=generator, device=class_labels.device) < probability
        return torch.where(drop, torch.full_like(class_labels, self.null_class_label), class_labels)

    # ------------------------------------------------------------------ export

    def to_dit_transformer(self, share_weights: bool = False) -> DiTTransformer2DModel:
        """A plain diffusers `DiTTransformer2DModel` with the same blocks and weights (identical embedder copies).

        With ``share_weights=True`` the export shares every tensor but the embedder copies with this model (cheap;
        meant for saving). The kept original indices travel in the config as ``_entprune_kept_block_indices``.
        """
        if self.skipped_block_indices:
            raise ValueError(
                f"Blocks {sorted(self.skipped_block_indices)} are skipped, which a plain DiTTransformer2DModel cannot "
                "express. Prune them with `prune_blocks(...)` or restore them with `skip_blocks([])` before exporting."
            )
        from accelerate import init_empty_weights

        config = {k: v for k, v in self.config.items() if k != "_class_name"}
        config.update(num_layers=self.num_blocks, **self._pruning_config())
        with init_empty_weights():
            plain = DiTTransformer2DModel.from_config(config)
        state = self.state_dict()  # tied embedders appear once per block here, as the same tensors
        seen: set[int] = set()
        for key, value in state.items():
            if not share_weights or value.data_ptr() in seen:
                state[key] = value.detach().clone()
            seen.add(value.data_ptr())
        plain.load_state_dict(state, strict=True, assign=True)
        _copy_buffers(self, plain, clone=not share_weights)
        return plain.train(self.training)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain `DiTTransformer2DModel` folder (loadable without this package)."""
        self.to_dit_transformer(share_weights=True).save_pretrained(save_directory, *args, **kwargs)


def _copy_buffers(source: nn.Module, target: nn.Module, clone: bool) -> None:
    """Give ``target`` the buffers of ``source`` (non-persistent ones, such as DiT's positional embedding, are not
    in the state dict that ``load_state_dict(assign=True)`` transfers)."""
    for name, buffer in source.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        setattr(target.get_submodule(module_name) if module_name else target, buffer_name,
                buffer.clone() if clone else buffer)


def _check_embedder_policy(embedder_copies: str):
    if embedder_copies not in EMBEDDER_POLICIES:
        raise ValueError(f"`embedder_copies` must be one of {EMBEDDER_POLICIES}, got {embedder_copies!r}.")


def check_dit_config(config: dict, argument: str, source: str) -> None:
    """Refuse configs that are not class-conditional, patched, adaLN-Zero DiT transformers."""
    class_name = config.get("_class_name")
    if class_name not in DIT_CLASS_NAMES:
        raise ValueError(
            f"`{argument}`={source!r} holds a {class_name or 'model without _class_name'}, not a DiT transformer "
            f"({', '.join(DIT_CLASS_NAMES[:2])}). For a pipeline folder, pass `subfolder='transformer'`."
        )
    if config.get("patch_size") is None or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or \
            config.get("num_embeds_ada_norm") is None:
        raise ValueError(
            f"`{argument}`={source!r} is a {class_name} but not a class-conditional DiT (needs patch_size, "
            f"norm_type='ada_norm_zero' and num_embeds_ada_norm; got {config.get('patch_size')}, "
            f"{config.get('norm_type')!r}, {config.get('num_embeds_ada_norm')})."
        )
