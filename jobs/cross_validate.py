"""`ray job submit --working-dir . -- python jobs/cross_validate.py --data URI --output URI [--folds 4 ...]`.

Exactly `resdsn cv` (same flags); see resdsn_ray/cv.py.
"""

import sys

from resdsn_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["cv", *sys.argv[1:]]))
