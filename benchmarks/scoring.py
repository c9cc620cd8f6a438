"""The scorers' cost per image on this machine: `load_scorers(...).score(images, prompts)` at batch 8.

    python -m benchmarks.scoring FOLDER [THREADS]      # FOLDER holds clip/, aesthetic/, safety/ (make-tiny-scorer)

Random images of 64, 256 and 1024 px, one warm-up call, then 15 timed calls; median and min per image.
"""

from __future__ import annotations

import statistics
import sys
import time


def main(folder: str, threads: int = 1) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from models.scoring import load_scorers

    torch.set_num_threads(threads)
    scorers = load_scorers(f"{folder}/clip", f"{folder}/aesthetic", f"{folder}/safety")
    rng = np.random.default_rng(0)
    for size in (64, 256, 1024):
        images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(8)]
        prompts = [f"prompt {i}: a red cube on a table" for i in range(8)]
        scorers.score(images, prompts)
        times = []
        for _ in range(15):
            started = time.perf_counter()
            scorers.score(images, prompts)
            times.append((time.perf_counter() - started) / len(images))
        print(
            f"{threads} thread(s), {size} px, batch 8: median {statistics.median(times) * 1000:.2f} ms per image, "
            f"min {min(times) * 1000:.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
