"""Adaptive progressive pruning: when to drop blocks, and how many.

Training runs in ``num_stages`` stages. At each stage boundary the controller is given the CED scores of the blocks
still in the model and forms candidates "drop the m lowest-CED blocks" for a few m, including m = 0 ("not now").
In ``adaptive`` mode each candidate is scored without training by the two zero-shot proxies (NTK condition number,
lower is better; ZiCo, higher is better), combined with equal weight, and the best candidate wins. Whatever the
proxies say, the last stage drops whatever is left, so the target is always met. ``fixed`` drops equal amounts at
every stage and ``one_shot`` drops everything at the first stage: the two comparisons of the paper.

The controller is plain logic: it never touches a model. The training script computes the scores, calls
`AdaptivePruningController.decide`, and prunes what it returns. Its state is a JSON-able dict, saved with every
checkpoint, so a resumed run continues with the same architecture and the same schedule.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

PRUNING_MODES = ("adaptive", "fixed", "one_shot")


def resolve_target(num_layers: int, target_prune_ratio: float | None = None, target_num_blocks: int | None = None,
                   target_num_params: int | None = None, params_per_block: int | None = None,
                   params_outside_blocks: int | None = None) -> int:
    """How many of ``num_layers`` blocks to remove: from a fraction (rounded to the nearest block), a count, or a
    parameter budget (the fewest blocks removed that bring the model to at most ``target_num_params``; DiT blocks
    are all the same size, so the budget maps to a block count exactly)."""
    if sum(x is not None for x in (target_prune_ratio, target_num_blocks, target_num_params)) != 1:
        raise ValueError("Give exactly one of `target_prune_ratio` (a fraction of the blocks), `target_num_blocks` "
                         "(a number of blocks to remove) and `target_num_params` (a parameter budget).")
    if target_num_params is not None:
        if params_per_block is None or params_outside_blocks is None:
            raise ValueError("`target_num_params` needs `params_per_block` and `params_outside_blocks` (see "
                             "`EntPrunedTransformer2DModel.parameter_counts`) to map the budget to blocks.")
        total = params_outside_blocks + num_layers * params_per_block
        if target_num_params < params_outside_blocks + params_per_block:
            raise ValueError(f"`target_num_params`={target_num_params:,} removes all {num_layers} blocks: one block "
                             f"and the layers outside the blocks take {params_outside_blocks + params_per_block:,}.")
        count = math.ceil(max(0, total - target_num_params) / params_per_block)
        if count < 1:
            raise ValueError(f"`target_num_params`={target_num_params:,} removes no block: the model has "
                             f"{total:,} parameters already.")
        return count
    if target_prune_ratio is not None:
        if not 0.0 < target_prune_ratio < 1.0:
            raise ValueError(f"`target_prune_ratio` must lie strictly between 0 and 1, got {target_prune_ratio}.")
        count, argument = round(target_prune_ratio * num_layers), f"`target_prune_ratio`={target_prune_ratio}"
    else:
        count, argument = int(target_num_blocks), f"`target_num_blocks`={target_num_blocks}"
    if count < 1:
        raise ValueError(f"{argument} removes no block of {num_layers}; ask for at least one block.")
    if count >= num_layers:
        raise ValueError(f"{argument} removes all {num_layers} blocks; at least one must stay.")
    return count


def decision_steps(num_stages: int, pruning_steps: int, mode: str = "adaptive") -> list[int]:
    """The training steps at which the controller decides: evenly spaced over ``[0, pruning_steps)``."""
    if mode not in PRUNING_MODES:
        raise ValueError(f"`pruning_mode` must be one of {PRUNING_MODES}, got {mode!r}.")
    if mode == "one_shot":
        return [0]
    if num_stages < 1:
        raise ValueError(f"`pruning_stages` must be >= 1, got {num_stages}.")
    if pruning_steps < num_stages:
        raise ValueError(f"`pruning_steps`={pruning_steps} is shorter than `pruning_stages`={num_stages}: each "
                         "stage needs at least one training step. Train longer or use fewer stages.")
    return [i * pruning_steps // num_stages for i in range(num_stages)]


def candidate_amounts(remaining: int, stages_left: int) -> list[int]:
    """How many blocks each candidate drops: 0 ("not now"), the even share of what is left, and twice that.

    At the last stage the only candidate is everything that is left.
    """
    if stages_left <= 1 or remaining == 0:
        return [remaining]
    share = math.ceil(remaining / stages_left)
    return sorted({0, share, min(2 * share, remaining)})


def fixed_amount(remaining: int, stages_left: int) -> int:
    """The even share of what is left (earlier stages take the remainder), so the total lands on the target."""
    return math.ceil(remaining / max(stages_left, 1))


def combine_proxies(ntk_condition_numbers: Sequence[float], zicos: Sequence[float]) -> list[float]:
    """Equal-weight combination of the proxies, higher = better.

    Each proxy is mapped to [0, 1] across the candidates (min-max; log10 for the condition number, which spans
    orders of magnitude; an infinite condition number, a singular NTK, scores 0), then the two are averaged. When
    all candidates tie on a proxy, it contributes 0.5 to each.
    """
    def normalised(values):
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return [0.5] * len(values)
        low, high = min(finite), max(finite)
        return [0.0 if not math.isfinite(v) else (0.5 if high == low else (v - low) / (high - low)) for v in values]

    # lower condition number is better: negate its log; -inf ZiCo (no gradient) is the worst
    ntk = normalised([-math.log10(k) if 0 < k < math.inf else -math.inf for k in ntk_condition_numbers])
    zico = normalised(list(zicos))
    return [0.5 * a + 0.5 * b for a, b in zip(ntk, zico)]


@dataclass
class Candidate:
    num_blocks: int
    blocks: list[int]  # original indices this candidate drops
    ntk_condition_number: float | None = None
    zico: float | None = None
    combined: float | None = None


@dataclass
class StageDecision:
    stage: int
    step: int
    ced_scores: dict[int, float]  # original block index -> CED, for the blocks present at this stage
    candidates: list[Candidate] = field(default_factory=list)
    pruned_blocks: list[int] = field(default_factory=list)
    num_blocks_after: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ced_scores"] = {str(k): v for k, v in self.ced_scores.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "StageDecision":
        data = dict(data)
        data["ced_scores"] = {int(k): v for k, v in data["ced_scores"].items()}
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        return cls(**data)


class AdaptivePruningController:
    """Decides, at each of its decision steps, which blocks to drop.

    Args:
        original_num_layers: blocks of the unpruned model.
        num_to_prune: blocks to remove in total (see `resolve_target`).
        steps: the training steps at which to decide (see `decision_steps`); the last one meets the target.
        mode: ``adaptive`` (proxies choose among candidates), ``fixed`` (even amounts) or ``one_shot``.
        rank_once: rank by the CED of the first stage only, instead of re-ranking the remaining blocks at every
            stage (re-ranking is the default: the ranking of a fine-tuned, partly pruned model can change).
    """

    def __init__(self, original_num_layers: int, num_to_prune: int, steps: Sequence[int], mode: str = "adaptive",
                 rank_once: bool = False):
        if mode not in PRUNING_MODES:
            raise ValueError(f"`pruning_mode` must be one of {PRUNING_MODES}, got {mode!r}.")
        if not 0 <= num_to_prune < original_num_layers:  # 0: fine-tuning only, every stage decides nothing
            raise ValueError(f"`num_to_prune` must be in [0, {original_num_layers - 1}], got {num_to_prune}.")
        if list(steps) != sorted(set(steps)) or not steps:
            raise ValueError(f"Decision `steps` must be distinct and increasing, got {list(steps)}.")
        self.original_num_layers, self.num_to_prune = original_num_layers, num_to_prune
        self.steps, self.mode, self.rank_once = list(steps), mode, rank_once
        self.decisions: list[StageDecision] = []

    @property
    def pruned_blocks(self) -> list[int]:
        return [b for d in self.decisions for b in d.pruned_blocks]

    @property
    def remaining_to_prune(self) -> int:
        return self.num_to_prune - len(self.pruned_blocks)

    @property
    def finished(self) -> bool:
        return len(self.decisions) == len(self.steps)

    def is_decision_step(self, step: int) -> bool:
        return not self.finished and step >= self.steps[len(self.decisions)]

    def needs_ced(self) -> bool:
        """Whether the next decision needs fresh CED scores (not when ranking once and already ranked, nor when the
        target is already met)."""
        return self.remaining_to_prune > 0 and not (self.rank_once and self.decisions)

    def decide(self, step: int, ced_scores: dict[int, float] | None,
               proxy_fn: Callable[[list[list[int]]], list[tuple[float, float]]] | None = None) -> StageDecision:
        """Make the decision of the current stage.

        Args:
            ced_scores: original block index -> CED for every block still in the model; ``None`` when
                `needs_ced` is false (``rank_once`` after the first stage reuses the first stage's scores; once the
                target is met nothing is ranked).
            proxy_fn: given candidate block lists, returns (NTK condition number, ZiCo) per candidate; called only
                in ``adaptive`` mode when there is more than one candidate.
        """
        if self.finished:
            raise RuntimeError("Every pruning stage has been decided already.")
        present = [i for i in range(self.original_num_layers) if i not in set(self.pruned_blocks)]
        if ced_scores is None:
            if self.needs_ced():
                raise ValueError("`ced_scores` are needed for this stage.")
            # target already met: nothing to rank; ranking once: the first stage's scores
            ced_scores = {i: self.decisions[0].ced_scores[i] for i in present} if self.remaining_to_prune else {}
        if not ced_scores and not self.remaining_to_prune:
            stage = len(self.decisions)
            self.decisions.append(StageDecision(stage=stage, step=step, ced_scores={},
                                                candidates=[Candidate(num_blocks=0, blocks=[])],
                                                num_blocks_after=len(present)))
            return self.decisions[-1]
        if sorted(ced_scores) != present:
            raise ValueError(f"`ced_scores` must score exactly the blocks still present {present}, "
                             f"got {sorted(ced_scores)}.")
        stage = len(self.decisions)
        stages_left = len(self.steps) - stage
        remaining = self.remaining_to_prune
        order = sorted(present, key=lambda i: (ced_scores[i], i))  # lowest CED first; ties by index

        if self.mode == "adaptive":
            amounts = candidate_amounts(remaining, stages_left)
        elif self.mode == "fixed":
            amounts = [fixed_amount(remaining, stages_left)]
        else:
            amounts = [remaining]
        candidates = [Candidate(num_blocks=m, blocks=sorted(order[:m])) for m in amounts]
        if len(candidates) > 1:
            if proxy_fn is None:
                raise ValueError("Adaptive mode needs `proxy_fn` to score its candidates.")
            values = proxy_fn([c.blocks for c in candidates])
            combined = combine_proxies([v[0] for v in values], [v[1] for v in values])
            for candidate, (ntk, zico), score in zip(candidates, values, combined):
                candidate.ntk_condition_number, candidate.zico, candidate.combined = float(ntk), float(zico), score
            # best combined score; on a tie, the larger drop (the target must be met anyway, and pruning early
            # leaves more fine-tuning for the smaller model)
            chosen = max(candidates, key=lambda c: (round(c.combined, 12), c.num_blocks))
        else:
            chosen = candidates[0]
        decision = StageDecision(stage=stage, step=step, ced_scores=dict(ced_scores), candidates=candidates,
                                 pruned_blocks=list(chosen.blocks),
                                 num_blocks_after=len(present) - chosen.num_blocks)
        self.decisions.append(decision)
        return decision

    def state_dict(self) -> dict:
        return {"original_num_layers": self.original_num_layers, "num_to_prune": self.num_to_prune,
                "steps": self.steps, "mode": self.mode, "rank_once": self.rank_once,
                "decisions": [d.to_dict() for d in self.decisions]}

    def load_state_dict(self, state: dict) -> None:
        mine = {k: v for k, v in self.state_dict().items() if k != "decisions"}
        theirs = {k: state[k] for k in mine}
        if mine != theirs:
            raise ValueError(f"The saved pruning schedule {theirs} differs from this run's {mine}; resume with the "
                             "same pruning arguments.")
        self.decisions = [StageDecision.from_dict(d) for d in state["decisions"]]
