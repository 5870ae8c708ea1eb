"""``python -m stitching.probe`` — linear probes on a model's cut points: how much of the task a
layer's representation makes linearly readable.

A probe is a linear classifier (softmax regression on standardised features, Adam) trained on
the training split of the stitching data — un-augmented — and scored on its test split. The
features are a cut point's activation, pooled (a map's spatial mean, the layout's pooled token)
or whole (``probe.pool=false``), after the same rank truncation a stitch sees with
``stitch.front_rank``: the top principal directions over channels, fitted on the DM samples.
Results are cached per (model, layer, rank, settings) beside the zoo, so a grounding test that
asks again reads them back.

Writes ``probes.json``, ``probes.csv`` and ``probes.png`` (accuracy per layer) to ``--out``.

Example: ``python -m stitching.probe experiment=small probe.layers=[1,5,9] probe.rank=4``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from stitching.errors import StitchingError, exit_on_user_error
from stitching.files import hold_folder
from stitching.models import cut, cut_point_names
from stitching.models.layout import channels, pooled
from stitching.probes import build_prober
from stitching.runtime import Stopwatch, versions, write_json_atomic


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from stitching.build import compose_config, load_models, read_settings
    from stitching.models import resolve_layer

    parser = argparse.ArgumentParser(prog="python -m stitching.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: outputs/probes/<time>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for stitching.train (probe.side, probe.layers, "
                        "probe.rank, probe.pool, probe.epochs…; default: experiment=demo)")
    args = parser.parse_args(argv)
    watch = Stopwatch()
    cfg = compose_config(args.overrides or ["experiment=demo"])
    settings = read_settings(cfg)
    options = settings.config["probe"]
    side = str(options["side"])
    if side not in ("front", "end"):
        raise StitchingError(f"probe.side={side}: choose front or end")
    out = hold_folder(Path(args.out) if args.out else Path("outputs/probes") / time.strftime("%Y-%m-%d_%H-%M-%S"),
                      "--out")
    front, front_record, end, end_record = load_models(settings, stitched=False)
    model, record = (front, front_record) if side == "front" else (end, end_record)
    layers = options["layers"]
    layers = [resolve_layer(model, v) for v in layers] if layers is not None else \
        list(range(1, len(cut_point_names(model)) + 1))
    prober = build_prober(settings)
    rank = options["rank"]
    rows = [prober.accuracy(model, record["key"], layer, rank)
            for layer in tqdm(layers, desc="probes", disable=args.no_progress, leave=False)]
    frame = pd.DataFrame([{k: r[k] for k in ("layer", "layer_name", "rank", "features", "train_acc", "test_acc", "cached")}
                          for r in rows]).fillna({"rank": "full"})
    frame.to_csv(out / "probes.csv", index=False)
    write_json_atomic(out / "probes.json", {"model": record["key"], "side": side, "probes": rows,
                                            "timings": watch.report(), "versions": versions()})
    _plot(frame, record["key"], out / "probes.png")
    print(f"linear probes on {record['key']} ({prober.dataset}: {len(prober.train_x)} train / "
          f"{len(prober.test_x)} test images, {'pooled' if prober.settings.pool else 'whole'} activations"
          f"{'' if rank is None else f', rank {rank}'})")
    print(frame.round(4).to_string(index=False))
    print(f"results in {out.resolve()}")


def _plot(frame: pd.DataFrame, title: str, path: Path) -> None:
    from stitching.results.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(frame["layer"], frame["test_acc"], marker="o", label="test")
    ax.plot(frame["layer"], frame["train_acc"], marker=".", ls="--", label="train")
    ax.set(xlabel="cut point", ylabel="probe accuracy", title=title, ylim=(0, 1.02))
    ax.legend()
    save_figure(plt, fig, path)


if __name__ == "__main__":
    main(sys.argv[1:])
