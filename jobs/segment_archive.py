"""`ray job submit --working-dir . -- python jobs/segment_archive.py [--input URI --output URI ...]`.

Exactly `resdsn archive` (same flags); with no flags, the demo. See resdsn_ray/pipeline.py.
"""

import sys

from resdsn_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["archive", *sys.argv[1:]]))
