"""A randomly initialised DenseNet121 weights file: the floor for image features.

    python benchmarks/mednist/random_weights.py OUT.pth [--seed 0]

No pretrained weights can be downloaded here; until ``train-backbone`` has trained weights on
the site's own images, the image worker can run on these (``PACS_IMAGE_WEIGHTS=OUT.pth``).
Retrieval on them is the floor any trained backbone must beat, not a target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.backbone import build_densenet121  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_densenet121().state_dict(), args.out)
    print(f"wrote {args.out} (DenseNet121, random initialisation, seed {args.seed})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
