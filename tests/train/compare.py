"""Comparisons shared by the training tests."""

from __future__ import annotations

import torch


def differences(got, want, path: str = "") -> list[str]:
    """Paths at which two nested dicts of tensors / numbers / None are not bit-identical."""
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(set(got) ^ set(want), key=str)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, torch.Tensor):
        same = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)
        return [] if same else [path]
    return [] if got == want else [path]
