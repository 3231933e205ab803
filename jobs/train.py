"""`ray job submit` entry point for training: exactly `resdsn train` (same flags).

    ray job submit --working-dir . -- python jobs/train.py --stage coarse --data s3://bucket/archive \
        --output s3://bucket/runs/coarse --workers 4 --gpu
"""

import sys

from resdsn_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
