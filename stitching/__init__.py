"""Measure the functional similarity of neural networks by model stitching.

From Python::

    import stitching
    stitching.cut_points(model)                   # where a model can be cut
    result = stitching.stitch(front, end, "layer2.1", "layer3.0", objective="fula",
                              train=(images, labels), test=(test_images, test_labels))
    result.save("stitched.pt"); stitching.load("stitched.pt", front, end)   # the same network
    stitching.load_runs("outputs/grids/…")        # every run under a folder: one tidy DataFrame
    stitching.compare(front, end, images, indices=["cka", "pwcca"])   # similarity indices: a DataFrame
"""

from pathlib import Path

__version__ = "0.1.0"

#: the Hydra config tree that ships inside the package
CONF_DIR = Path(__file__).resolve().parent / "conf"
#: the config keys that choose a run's cut points (a sweep over them is a grid's cells)
LAYER_KEYS = ("stitch.layer", "stitch.front_layer", "stitch.end_layer")

__all__ = ["StitchResult", "compare", "cut_points", "load", "load_runs", "load_stitch", "stitch"]


def __getattr__(name):  # the API pulls in Lightning; `import stitching` alone stays light
    if name == "load_runs":  # records → pandas, without Lightning
        from stitching.results.records import load_runs

        return load_runs
    if name == "compare":
        from stitching.similarity.frame import compare

        return compare
    if name in __all__:
        from stitching import api

        return getattr(api, "load" if name == "load_stitch" else name)
    raise AttributeError(f"module 'stitching' has no attribute {name!r}")
