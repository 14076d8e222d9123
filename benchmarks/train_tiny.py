"""Training speed of the tiny checkpoint on this machine: optimizer steps per second, measured in one run.

Runs `facellava.model.train.train` on synthetic data for a few settings and prints steps/s and samples/s, timed
between the first and the last optimizer step (model loading, the first step's warm-up and the final save are
left out), and each setting's ratio to the first one. The settings take turns for a few rounds and each reports
its median, so that load from other processes on a shared machine falls on all of them alike; the load average
is printed too.

    python benchmarks/train_tiny.py [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from facellava.model.synthetic import make_synthetic_data
from facellava.model.tiny import make_tiny_checkpoint
from facellava.model.train import TrainConfig, train


def steps_per_second(data: Path, checkpoint: Path, out: Path, config: TrainConfig) -> float:
    stamps: list[float] = []
    train(data, checkpoint, out, config, progress=False, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = make_tiny_checkpoint(root / "tiny")
        images = make_synthetic_data(root / "images", n=40, seed=0, videos=0)
        mixed = make_synthetic_data(root / "mixed", n=40, seed=0, videos=5)
        settings = [
            ("stage 2, images, batch 2", images, TrainConfig(stage=2, batch_size=2)),
            ("stage 2, images, batch 1", images, TrainConfig(stage=2, batch_size=1)),
            ("stage 1, images, batch 2", images, TrainConfig(stage=1, batch_size=2)),
            ("stage 2 + LoRA r64, images, batch 2", images, TrainConfig(stage=2, lora=True, batch_size=2)),
            ("stage 2, 1 in 8 a video, batch 2", mixed, TrainConfig(stage=2, batch_size=2)),
        ]
        load = os.getloadavg()[0]
        rates: list[list[float]] = [[] for _ in settings]
        for round_ in range(args.rounds):
            for i, (_, data, config) in enumerate(settings):
                config.max_steps, config.save_every = args.steps, 10 * args.steps
                rates[i].append(steps_per_second(data, checkpoint, root / f"out{round_}-{i}", config))
        print(f"tiny checkpoint, CPU, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds "
              f"per setting, load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
        reference = statistics.median(rates[0])
        for (name, _, config), measured in zip(settings, rates, strict=True):
            rate = statistics.median(measured)
            print(f"{name:38s} {rate:6.2f} steps/s  {rate * config.batch_size:6.2f} samples/s  "
                  f"x{rate / reference:.2f}  (rounds: {', '.join(f'{r:.2f}' for r in measured)})")


if __name__ == "__main__":
    main()
