"""Adversarial attacks: PGD for training and evaluation, AutoAttack for evaluation."""

from stitching.attacks.autoattack import autoattack_accuracy
from stitching.attacks.pgd import mix_adversarial, pgd, pgd_settings

__all__ = ["autoattack_accuracy", "mix_adversarial", "pgd", "pgd_settings"]
