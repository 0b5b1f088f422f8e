"""Worker of tests/test_pruner.py: trains a tiny DiT for a few steps with `EntPruner.step` at every step, under
``accelerate launch`` (several processes) or plain ``python`` (one), and the main process writes to ``argv[1]``:
the pruner's decisions, the kept blocks, what each step returned, and every rank's summary of its model, optimizer
and EMA (gathered), so the test can check that the ranks agree and that two processes decide as one does.

    python tests/pruner_worker.py out.json
    accelerate launch --multi_gpu --num_processes 2 tests/pruner_worker.py out.json   # ACCELERATE_USE_CPU=true
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from conftest import make_scheduler, make_tiny_dit  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from diffusers_entprune.config import EntPrunerConfig  # noqa: E402
from diffusers_entprune.models import EntPrunedTransformer2DModel  # noqa: E402
from diffusers_entprune.objectives import DiffusionObjective  # noqa: E402
from diffusers_entprune.pruner import EntPruner  # noqa: E402

NUM_LAYERS, TARGET_NUM_BLOCKS = 6, 3
NUM_STEPS, GLOBAL_BATCH = 7, 4
CONFIG = dict(target_num_blocks=TARGET_NUM_BLOCKS, pruning_mode="adaptive", pruning_stages=2, pruning_steps=4,
              ced_num_samples=32, ced_batch_size=16, proxy_batch_size=4)


def calibration_pool(n: int = 32):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def main(out_path: str) -> None:
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    assert GLOBAL_BATCH % world == 0
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(NUM_LAYERS, seed=0)).train()
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    pruner = EntPruner(EntPrunerConfig(**CONFIG), model, objective, calibration_pool(), accelerator=accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMAModel([p for p in model.parameters() if p.requires_grad], decay=0.9)
    prepared, optimizer = accelerator.prepare(model, optimizer)

    returned, losses = [], []
    for step in range(NUM_STEPS):
        before = prepared
        prepared = pruner.step(step, prepared, optimizer, ema)
        returned.append({"step": step, "type": type(prepared).__name__, "same_object": prepared is before,
                         "num_blocks": model.num_blocks})
        # the same global batch on every process; process p takes samples p, p + P, ...
        generator = torch.Generator().manual_seed(100 + step)
        x0 = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)
        t = objective.sample_timesteps(GLOBAL_BATCH, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x0, labels, t, noise = (v[rank::world].to(accelerator.device) for v in (x0, labels, t, noise))
        noised = objective.add_noise(x0, noise, t)
        loss = objective.loss(prepared(noised.noisy, timestep=t, class_labels=labels).sample, x0, noised).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step([p for p in model.parameters() if p.requires_grad])
        losses.append(loss.item())

    params = list(model.parameters())
    base = getattr(optimizer, "optimizer", optimizer)
    in_groups = [id(p) for group in base.param_groups for p in group["params"]]
    consistent = (in_groups == [id(p) for p in params] and {id(p) for p in base.state} == set(in_groups)
                  and [s.shape for s in ema.shadow_params] == [p.shape for p in params])
    with torch.no_grad():
        summary = torch.tensor(
            [float(model.num_blocks), float(consistent), float(len(base.state)),
             sum(p.double().sum().item() for p in params), sum(s.double().sum().item() for s in ema.shadow_params)],
            dtype=torch.float64, device=accelerator.device)
    summaries = accelerator.gather(summary[None]).cpu().tolist()
    decisions_by_rank = gather_object([json.dumps(pruner.state_dict()["controller"], sort_keys=True)])
    kept_by_rank = gather_object([list(model.kept_block_indices)])
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"num_processes": world, "decision_steps": pruner.decision_steps,
                       "decisions": pruner.state_dict()["controller"]["decisions"], "finished": pruner.finished,
                       "kept_block_indices": model.kept_block_indices, "kept_by_rank": kept_by_rank,
                       "decisions_by_rank": decisions_by_rank, "rank_summaries": summaries, "returned": returned,
                       "losses": losses}, f)
    accelerator.wait_for_everyone()
    # Skip the interpreter's teardown: freeing the last DDP reducer there destroys the gloo process group, whose
    # destructor joins gloo's worker thread while holding the GIL, and that thread can be waiting for the GIL to free
    # a finished collective's tensor (seen once in ~6 runs: both ranks hang after writing the result).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
