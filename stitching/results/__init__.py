"""What a sweep left behind, as data and figures: records, tables and figures (the library
behind ``python -m stitching.report`` and every tool that draws)."""
