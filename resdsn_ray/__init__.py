"""ResDSN 3D coarse-to-fine CT segmentation (Zhu et al., 3DV 2018) on Ray.

The compute core (io, preprocess, model, windows, postprocess, engine, metrics, synthetic,
bundle, storage, config) imports no Ray, so a GPU box with torch alone can run it.
"""

__version__ = "0.1.0"
