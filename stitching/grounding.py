"""``python -m stitching.grounding`` — do similarity measures track function? The sensitivity and
specificity tests of Ding, Denain & Steinhardt (NeurIPS 2021), as used by Balogh & Jelasity (2025),
for stitching objectives and structural indices alike (:mod:`stitching.groundings` says what an
item, a test and a score are).

Writes to ``--out``: ``grounding.md`` / ``.csv`` (measure × test: ρ, interval, items),
``grounding.png`` (the same with whiskers), ``items.csv`` (every item's functional difference and
dissimilarities), ``grounding.json`` (all of it, settings, timings) and ``stitching/``, one
ordinary run folder per stitch (those of one front model and rank train as one grid; a stopped
test resumes without redoing them; probes are cached beside the zoo). Exits non-zero after everything else ran if a stitching run failed.

Example: ``python -m stitching.grounding experiment=grounding_small`` (``make grounding-small``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stitching.errors import exit_on_user_error, on_interrupt
from stitching.files import hold_folder
from stitching.groundings import TESTS, run_tests


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from stitching.build import compose_config, read_settings

    parser = argparse.ArgumentParser(prog="python -m stitching.grounding", description=__doc__.splitlines()[0])
    parser.add_argument("--test", default=None, choices=[*TESTS, "both"], help="default: grounding.test")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/grounding/<time>); an existing one "
                        "resumes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=grounding_small)")
    args = parser.parse_args(argv)
    overrides = [*(args.overrides or ["experiment=grounding_small"]),
                 *([f"grounding.test={args.test}"] if args.test else [])]
    settings = read_settings(compose_config(overrides))
    out = hold_folder(Path(args.out) if args.out else Path("outputs/grounding") / time.strftime("%Y-%m-%d_%H-%M-%S"),
                      "--out")
    on_interrupt(f"every finished stitching run keeps its results.json in {out}; rerun the same command with "
                 f"--out {out} to run only the rest")
    record = run_tests(settings, overrides, out, progress=not args.no_progress)
    print((out / "grounding.md").read_text())
    print(f"{record['timings']['total_s']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in record['timings'].items() if k != 'total_s')}); "
          f"results in {out.resolve()}")
    if record["failed"]:
        print(f"error: {len(record['failed'])} stitching run(s) failed; their records are in {out / 'stitching'}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
