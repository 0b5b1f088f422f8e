"""The result every importance metric returns: one score per kept block, higher = more important."""

from dataclasses import dataclass, field


@dataclass
class ImportanceResult:
    method: str
    block_indices: list[int]  # original indices of the scored blocks
    scores: list[float]
    num_samples: int = 0
    options: dict = field(default_factory=dict)

    def _importance(self, k: int) -> float:
        return self.scores[k]

    @property
    def ranking(self) -> list[int]:
        """Original block indices from least to most important (ties broken by index)."""
        order = sorted(range(len(self.scores)), key=lambda k: (self._importance(k), self.block_indices[k]))
        return [self.block_indices[k] for k in order]

    def to_dict(self) -> dict:
        return {"method": self.method, "num_layers": len(self.block_indices), "block_indices": self.block_indices,
                "scores": self.scores, "ranking": self.ranking, "num_samples": self.num_samples,
                "options": self.options}
