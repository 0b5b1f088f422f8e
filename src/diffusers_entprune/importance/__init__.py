from .ced import CEDOptions, CEDResult, GaussianEntropyAccumulator, compute_ced

__all__ = ["CEDOptions", "CEDResult", "GaussianEntropyAccumulator", "compute_ced"]
