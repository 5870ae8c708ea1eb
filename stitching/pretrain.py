"""``python -m stitching.pretrain`` — train base models into the zoo, or list it.

    python -m stitching.pretrain [--seeds 0 1 2] [hydra overrides…]   train what is missing
    python -m stitching.pretrain --list [hydra overrides…]             show the cache

Overrides are those of ``stitching.train`` (``model=…``, ``dataset=…``, ``zoo.recipe.epochs=…``);
without ``--seeds`` it prepares the run's front and end models.
"""

from __future__ import annotations

import argparse
import sys

from stitching.errors import exit_on_user_error
from stitching.build import build_zoo, compose_config, read_settings


def _table(records: list[dict]) -> str:
    if not records:
        return "(the zoo is empty)"
    lines = [f"{'model':<44} {'source':<12} {'test acc':>8} {'train s':>8}  {'sha256':<12}  path / hub"]
    for r in records:
        acc = (f"{r['test_acc'] * 100:7.2f}%" if r.get("test_acc") is not None
               else "   error" if "error" in r else "       —")
        digest = (r.get("sha256") or "")[:12] or "—"
        where = r.get("path") or r.get("hub") or ""
        if r.get("path") and r.get("hub"):
            where = f"{r['path']} ({r['hub']})"
        lines.append(f"{r['key']:<44} {r.get('source', 'trained here'):<12} {acc:>8} {r.get('train_time_s', '—'):>8}"
                     f"  {digest:<12}  {where}")
        if "error" in r:
            lines.append(f"    {r['error']}")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stitching.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the cached base models and exit")
    parser.add_argument("--seeds", type=int, nargs="+", help="train these seeds of the front model's spec")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train")
    args = parser.parse_args(argv)
    settings = read_settings(compose_config(args.overrides))  # the recipe's settings, before any epoch
    zoo = build_zoo(settings)
    if not args.list:
        specs = [settings.front.spec, settings.end.spec]
        if args.seeds:
            base = settings.front.spec
            specs = [type(base)(**{**base.__dict__, "seed": seed}) for seed in args.seeds]
        for spec in dict.fromkeys(specs):
            zoo.get(spec)
    print(f"zoo: {zoo.root.resolve()}")
    print(_table(zoo.list()))


if __name__ == "__main__":
    main(sys.argv[1:])
