"""EntPruner as an object that prunes inside any training loop.

    pruner = EntPruner(EntPrunerConfig(target_prune_ratio=0.5, pruning_steps=1000), model, objective, calibration)
    for step in range(num_steps):
        model = pruner.step(step, model, optimizer, ema)  # a no-op except at the stage boundaries
        ...  # the caller's own forward, loss, backward, optimizer and EMA steps

At each stage boundary (``config.pruning_stages`` of them, spread over the first ``config.pruning_steps`` steps) the
blocks still in the model are ranked on a fixed calibration pool (CED by default), the candidates "drop the m
lowest-ranked blocks" are scored by the zero-shot proxies (NTK condition number, ZiCo; adaptive mode), the chosen
blocks leave the model, the optimizer state and the EMA, and under several processes the model is wrapped again
for DDP. The main process decides and broadcasts, so every process prunes the same blocks. `state_dict` goes in
the caller's checkpoints; `report` is what `save_pruned_pipeline` writes to ``entprune_report.json``.
"""

import logging
import time
from collections.abc import Iterable

import torch

from .config import EntPrunerConfig
from .controller import AdaptivePruningController, decision_steps
from .data import collect_pool
from .importance import score_blocks
from .models import EntPrunedTransformer2DModel
from .objectives import Objective
from .proxies import score_candidates
from .randomness import shard_batches
from .report import PruningReport
from .training_state import prune_training_state, reprepare_model

logger = logging.getLogger(__name__)

CalibrationData = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


class EntPruner:
    """Prunes whole transformer blocks of a DiT or SiT while it is fine-tuned (EntPruner, arXiv 2511.21122).

    Args:
        config (`EntPrunerConfig`):
            Every pruning setting: the target, the schedule (``pruning_mode``, ``pruning_stages``,
            ``pruning_steps``, which must be set), the ranking and its options, the proxies and the seeds.
        model (`EntPrunedTransformer2DModel`):
            The model being trained, before or after ``accelerator.prepare`` (the pruner works on the unwrapped
            module, which pruning keeps: the kept blocks' parameters stay the same objects).
        objective (`Objective`):
            The training objective (`DiffusionObjective` for DiT, `FlowObjective` for SiT; see
            `model_types.objective_for`): ranking and proxies measure the model's prediction and loss through it.
        calibration_data (`tuple[torch.Tensor, torch.Tensor]` or iterable of them):
            Clean latents (already scaled by the VAE's ``scaling_factor``) and their class ids: either two tensors,
            or an iterable of ``(latents, labels)`` batches such as `data.calibration_batches`, read lazily at the
            first stage that ranks and repeated when shorter than ``config.calibration_pool_size``. Every stage uses
            the same pool, so the stages are comparable. Every process must pass the same pool.
        accelerator (`accelerate.Accelerator`, *optional*, defaults to `None`):
            With several processes: ranking statistics are summed over them, the main process decides and
            broadcasts, and the model is wrapped again after pruning. Without one, a single process is assumed.
    """

    def __init__(self, config: EntPrunerConfig, model: EntPrunedTransformer2DModel, objective: Objective,
                 calibration_data: CalibrationData | None, accelerator=None):
        if not isinstance(config, EntPrunerConfig):
            raise TypeError(f"`config` must be an `EntPrunerConfig`, got {type(config).__name__}.")
        if config.pruning_steps is None:
            raise ValueError("`config.pruning_steps` is not set: the stage boundaries are spread over the first "
                             "`pruning_steps` training steps (examples/prune_dit.py uses half of its training steps).")
        self.config, self.objective, self.accelerator = config, objective, accelerator
        self.model = self._unwrap(model)
        if not isinstance(self.model, EntPrunedTransformer2DModel):
            raise TypeError("`model` must be an `EntPrunedTransformer2DModel` (load it with "
                            "`EntPrunedTransformer2DModel.from_pretrained(..., subfolder='transformer')`), got "
                            f"{type(self.model).__name__}.")
        self.num_to_prune = config.num_blocks_to_prune(self.model)
        self.controller = AdaptivePruningController(
            self.model.original_num_layers, self.num_to_prune,
            decision_steps(config.pruning_stages, config.pruning_steps, config.pruning_mode), config.pruning_mode,
            rank_once=config.rank_once)
        if calibration_data is None and self.num_to_prune:
            raise ValueError(f"`calibration_data` is needed to rank the blocks: {self.num_to_prune} are to be pruned.")
        self._calibration_source, self._pool = calibration_data, None
        self.stage_seconds: list[float] = []  # wall time of each stage (ranking, proxies, surgery)
        self.stage_breakdown: list[dict] = []  # the same, per part: {"ranking", "proxies", "surgery"} seconds

    # ------------------------------------------------------------------------------------------ state

    @property
    def pruned_blocks(self) -> list[int]:
        """Original indices of the blocks pruned so far."""
        return self.controller.pruned_blocks

    @property
    def finished(self) -> bool:
        """Whether every stage has been decided (then `step` never prunes again)."""
        return self.controller.finished

    @property
    def decision_steps(self) -> list[int]:
        """The training steps at which `step` runs a stage."""
        return list(self.controller.steps)

    def is_decision_step(self, global_step: int) -> bool:
        return self.controller.is_decision_step(global_step)

    def state_dict(self) -> dict:
        """JSON-able state for the caller's checkpoints: the config and every decision so far."""
        return {"config": self.config.to_dict(), "controller": self.controller.state_dict(),
                "stage_seconds": list(self.stage_seconds), "stage_breakdown": list(self.stage_breakdown)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s decisions and prune the model to match. Call it before ``accelerator.prepare``
        (the prepared model would need wrapping again). A bare controller state, as checkpoints of
        examples/prune_dit.py before 0.1 stored it, is accepted too."""
        controller = state["controller"] if "controller" in state else state
        self.controller.load_state_dict(controller)  # refuses another schedule, naming both
        self.stage_seconds = list(state.get("stage_seconds", []))
        self.stage_breakdown = list(state.get("stage_breakdown", []))
        missing = [b for b in self.controller.pruned_blocks if b in self.model.kept_block_indices]
        if missing:
            self.model.prune_blocks(missing)

    # ------------------------------------------------------------------------------------------ the stage

    def step(self, global_step: int, model, optimizer=None, ema=None):
        """Run the pruning stage due at ``global_step``, if any; call it once per optimizer step, before the
        forward pass. Returns the model to train from now on: the same object, or under several processes a new
        DDP wrapper of it after blocks were pruned.

        Args:
            global_step (`int`): optimizer steps taken so far.
            model: the (prepared) model being trained; its module must be the pruner's model.
            optimizer (`torch.optim.Optimizer`, *optional*): its state of the removed parameters is dropped.
            ema (`diffusers.training_utils.EMAModel`, *optional*): built over the model's trainable parameters
                in ``model.parameters()`` order; its shadows of the removed parameters are dropped.
        """
        if not self.controller.is_decision_step(global_step):
            return model
        if self._unwrap(model) is not self.model:
            raise ValueError("`model` is not the model this pruner was built for (pass the model being trained, "
                             "prepared or not).")
        start = time.perf_counter()
        accelerator, unwrapped = self.accelerator, self.model
        was_training = unwrapped.training
        unwrapped.eval()
        parts = {"ranking": 0.0, "proxies": 0.0, "surgery": 0.0}

        def score_candidates(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return self._score_candidates(*args, **kwargs)
            finally:
                parts["proxies"] += time.perf_counter() - begin

        try:
            scores = self._rank() if self.controller.needs_ced() else None
            parts["ranking"] = time.perf_counter() - start
            state = [None]
            if self._is_main_process:
                self.controller.decide(global_step, scores, score_candidates)
                state = [self.controller.state_dict()]
            if self._num_processes > 1:  # one decision for all: GPU arithmetic need not agree bit for bit
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(state)
                self.controller.load_state_dict(state[0])
            decision = self.controller.decisions[-1]
            if decision.pruned_blocks:
                begin = time.perf_counter()
                prune_training_state(unwrapped, decision.pruned_blocks, optimizer, ema)
                if accelerator is not None:
                    model = reprepare_model(accelerator, model, unwrapped)
                parts["surgery"] = time.perf_counter() - begin
        finally:  # the caller's mode, even when a stage fails
            unwrapped.train(was_training)
        self.stage_seconds.append(round(time.perf_counter() - start, 3))
        self.stage_breakdown.append({name: round(seconds, 3) for name, seconds in parts.items()})
        self._log(decision, global_step)
        return model

    @property
    def _is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def _num_processes(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else \
            getattr(model, "module", model)

    @property
    def needs_calibration(self) -> bool:
        """Whether a stage still to come ranks blocks or scores candidates on the calibration pool."""
        return not self.controller.finished and self.controller.remaining_to_prune > 0

    def calibration_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed pool (latents, labels), on the CPU, collected at its first use."""
        if self._pool is None:
            self._pool = collect_pool(self._calibration_source, self.config.calibration_pool_size)
        return self._pool

    def _rank(self) -> dict[int, float]:
        config, accelerator = self.config, self.accelerator
        latents, labels = self.calibration_pool()
        process_index = 0 if accelerator is None else accelerator.process_index
        device = next(self.model.parameters()).device

        def sum_over_processes(tensor):
            return accelerator.reduce(tensor.to(device), "sum").cpu() if self._num_processes > 1 else tensor

        pool = shard_batches(zip(latents.split(config.ced_batch_size), labels.split(config.ced_batch_size)),
                             process_index, self._num_processes)
        result = score_blocks(config.ranking, self.model, self.objective, pool, config.ced_num_samples,
                              seed=config.ranking_seed, ced_options=config.ced_options,
                              progress=accelerator is None or accelerator.is_local_main_process,
                              reduce=sum_over_processes, process_index=process_index,
                              num_processes=self._num_processes, num_to_prune=self.controller.remaining_to_prune,
                              learned_options=config.learned_options)
        return dict(zip(result.block_indices, result.scores))

    def _score_candidates(self, candidates: list[list[int]]) -> list[tuple[float, float]]:
        """(NTK condition number, ZiCo) of each candidate, on the first samples of the pool (main process)."""
        latents, labels = self.calibration_pool()
        device, b = next(self.model.parameters()).device, self.config.proxy_batch_size
        ntk_batch = (latents[:b].to(device), labels[:b].to(device))
        zico_batches = [(latents[b * (i + 1): b * (i + 2)].to(device), labels[b * (i + 1): b * (i + 2)].to(device))
                        for i in range(self.config.zico_num_batches)]
        scored = score_candidates(self.model, self.objective, candidates, ntk_batch, zico_batches,
                                  seed=self.config.seed, zico_reduction=self.config.zico_reduction, progress=True)
        return [(s.ntk_condition_number, s.zico) for s in scored]

    def _log(self, decision, global_step: int) -> None:
        summary = ", ".join(f"m={c.num_blocks}: kappa={c.ntk_condition_number:.3g} zico={c.zico:.4g} "
                            f"score={c.combined:.3f}" for c in decision.candidates if c.combined is not None)
        if self._is_main_process:
            logger.info(f"Stage {decision.stage} at step {global_step}: dropped {decision.pruned_blocks or 'nothing'} "
                        f"-> {decision.num_blocks_after} blocks ({summary or 'no choice to make'})")
        if self.accelerator is None:
            return
        logs = {"pruning/num_blocks": decision.num_blocks_after, "pruning/stage": decision.stage,
                "pruning/dropped": len(decision.pruned_blocks)}
        for c in decision.candidates:  # the proxies of every candidate, by how many blocks it drops
            if c.combined is not None:
                logs.update({f"pruning/ntk_condition_number_m{c.num_blocks}": c.ntk_condition_number,
                             f"pruning/zico_m{c.num_blocks}": c.zico, f"pruning/combined_m{c.num_blocks}": c.combined})
        self.accelerator.log(logs, step=global_step)

    # ------------------------------------------------------------------------------------------ the report

    def report(self) -> PruningReport:
        """The pruning part of ``entprune_report.json``: what was pruned, how and why (every stage's scores,
        candidates, proxy values and choice, and the config). Pass it to `save_pruned_pipeline` (``report=``), which
        adds what the saved model is; the model card reads the result."""
        config, ranking = self.config, self.config.ranking
        method = f"EntPruner ({config.pruning_mode} schedule, CED ranking)" if ranking == "ced" else \
            f"{config.pruning_mode} schedule, {ranking} ranking (a baseline)"
        return PruningReport(pruning_mode=config.pruning_mode, ranking=ranking,
                             pruned_by={"method": method, "stages": len(self.controller.decisions)},
                             stages=[d.to_dict() for d in self.controller.decisions],
                             pruning_stage_seconds=list(self.stage_seconds),
                             pruning_stage_breakdown=list(self.stage_breakdown), pruning_config=config.to_dict())
