"""Published values a report sets its runs beside: the FuLA paper's Table 1, the base models'
test accuracy and AutoAttack-rand robust accuracy."""

from __future__ import annotations

import re

import pandas as pd

#: FuLA paper, Table 1 (App. A): (dataset, architecture, model index, adversarially trained) →
#: (test accuracy, AutoAttack-rand robust accuracy). The model index is the zoo's seed
#: (``cifar10_0`` ↔ seed 0); the paper's models are 64 channels wide.
FULA_TABLE_1: dict[tuple[str, str, int, bool], tuple[float, float]] = {
    ("cifar10", "resnet18_nores", 0, False): (0.9421, 0.0), ("cifar10", "resnet18", 0, False): (0.9451, 0.0),
    ("cifar10", "resnet34", 0, False): (0.9414, 0.0),
    ("cifar10", "resnet18_nores", 1, False): (0.9421, 0.0), ("cifar10", "resnet18", 1, False): (0.9403, 0.0),
    ("cifar10", "resnet34", 1, False): (0.9491, 0.0),
    ("ls_imagenet10", "resnet18_nores", 0, False): (0.7612, 0.0), ("ls_imagenet10", "resnet18", 0, False): (0.748, 0.0),
    ("ls_imagenet10", "resnet34", 0, False): (0.7493, 0.0),
    ("cifar10", "resnet18_nores", 0, True): (0.8486, 0.4059), ("cifar10", "resnet18", 0, True): (0.8552, 0.4073),
    ("cifar10", "resnet34", 0, True): (0.8669, 0.4289),
    ("cifar10", "resnet18_nores", 1, True): (0.8517, 0.4099), ("cifar10", "resnet18", 1, True): (0.8496, 0.4065),
    ("cifar10", "resnet34", 1, True): (0.8622, 0.4286),
    ("ls_imagenet10", "resnet18_nores", 0, True): (0.662, 0.218), ("ls_imagenet10", "resnet18", 0, True): (0.6323, 0.226),
    ("ls_imagenet10", "resnet34", 0, True): (0.6379, 0.222),
}
PAPER_WIDTH = 64


def table_1(frame: pd.DataFrame) -> pd.DataFrame:
    """Every base model of ``frame`` that Table 1 lists (its dataset, architecture, seed and
    robustness, 64 channels wide): its accuracy and robust accuracy here, the paper's, and the
    differences. Empty when no model of the runs is one of the paper's."""
    rows = {}
    for side in ("front", "end"):
        columns = [f"{side}_{name}" for name in ("model", "dataset", "arch", "seed", "robust", "acc")]
        if not set(columns) <= set(frame.columns):
            continue
        robust_column = f"{side}_robust_acc_autoattack"
        for _, run in frame.iterrows():
            model = run[f"{side}_model"]
            width = re.search(r"-w(\d+)-", str(model))
            key = (run[f"{side}_dataset"], run[f"{side}_arch"], run[f"{side}_seed"], bool(run[f"{side}_robust"]))
            if model in rows or key not in FULA_TABLE_1 or not width or int(width.group(1)) != PAPER_WIDTH:
                continue
            paper_acc, paper_robust = FULA_TABLE_1[key]
            robust = run.get(robust_column) if robust_column in frame else None
            robust = None if robust is None or pd.isna(robust) else float(robust)
            rows[model] = {"model": model, "dataset": key[0], "arch": key[1], "seed": key[2], "robust": key[3],
                           "acc": float(run[f"{side}_acc"]), "paper_acc": paper_acc,
                           "acc_diff": float(run[f"{side}_acc"]) - paper_acc,
                           "robust_acc_autoattack": robust, "paper_robust_acc": paper_robust,
                           "robust_diff": None if robust is None else robust - paper_robust}
    return pd.DataFrame(list(rows.values()))
