#!/usr/bin/env python
"""Fine-tune a pretrained SiT on a downstream dataset while pruning whole transformer blocks (EntPruner).

This is `prune_dit.py` with ``--model_type sit``: one script serves both families, since they share the backbone,
the pruning and the training loop, and differ only in the objective (flow, velocity prediction) and the pipeline
that samples them (`SiTPipeline`). Every flag of prune_dit.py applies; see ``--help``.

    # the embedded default: tiny digits SiT and the bundled downstream digits
    accelerate launch examples/prune_sit.py

    # a real SiT: convert the original checkpoint once, then prune it
    entprune convert --checkpoint SiT-XL-2-256x256.pt --model_type sit --vae stabilityai/sd-vae-ft-ema \
      --output_dir sit-xl-2-256
    accelerate launch examples/prune_sit.py --pretrained_model_name_or_path sit-xl-2-256 \
      --dataset_name <a Hub or local dataset> --target_prune_ratio 0.5 --max_train_steps 100000 \
      --mixed_precision bf16 --use_ema --output_dir sit-xl-pruned
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prune_dit import main  # noqa: E402


def sit_main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return main(["--model_type", "sit", *argv])


if __name__ == "__main__":
    sit_main()
