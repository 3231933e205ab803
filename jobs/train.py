"""`ray job submit` entry point for training; the same flags as `resdsn train`.

    ray job submit --working-dir . -- python jobs/train.py --stage coarse --data s3://bucket/archive \
        --output s3://bucket/runs/coarse --workers 4 --gpu
"""

from __future__ import annotations

import argparse
import sys

from resdsn_ray.errors import InputError
from resdsn_ray.training import add_train_flags, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a ResDSN stage with Ray Train (see resdsn_ray/training.py)")
    add_train_flags(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
