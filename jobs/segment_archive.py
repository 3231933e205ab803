"""`ray job submit --working-dir . -- python jobs/segment_archive.py [--input URI --output URI ...]`.

With no flags it builds a small synthetic archive under ./demo-output, starts a local Ray,
segments it with the shipped demo bundles and prints the summary. See resdsn_ray.pipeline.
"""

import sys

from resdsn_ray.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
