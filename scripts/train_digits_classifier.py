"""Train the digit classifier that judges class fidelity of generated samples (real images only).

Trained on the ``train`` splits of both styles of the embedded digits, with random shifts and pixel noise so that it
tolerates the small imperfections of generated images; accuracy is reported on the held-out ``test`` splits.

Reproduce (seed 0, about 1 minute on two CPU cores):

    python scripts/train_digits_classifier.py --output_dir src/diffusers_entprune/assets/digits-classifier
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from diffusers_entprune.classifier import DigitClassifier
from diffusers_entprune.embedded import DIGITS_STYLES, digits_to_tensors, load_digits_dataset


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    h, w = images.shape[-2:]
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="src/diffusers_entprune/assets/digits-classifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = [digits_to_tensors(load_digits_dataset(style, split="train")) for style in DIGITS_STYLES]
    images = torch.cat([x for x, _ in train])
    labels = torch.cat([y for _, y in train])

    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    steps = args.epochs * ((len(images) + args.batch_size - 1) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=steps)
    start = time.time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(args.batch_size):
            x = random_shift(images[batch], 3, generator)
            x = x + 0.1 * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f}")

    model.eval()
    accuracy = {}
    for style in DIGITS_STYLES:
        x, y = digits_to_tensors(load_digits_dataset(style, split="test"))
        accuracy[style] = (model.predict(x) == y).float().mean().item()
    print(f"held-out accuracy: {accuracy} ({time.time() - start:.0f} s)")
    model.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as f:
        json.dump({"test_accuracy": accuracy, "seed": args.seed, "epochs": args.epochs,
                   "train_seconds": round(time.time() - start, 1)}, f, indent=2)


if __name__ == "__main__":
    main()
