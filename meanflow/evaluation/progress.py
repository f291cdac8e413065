"""Progress bars of the evaluation stages (sampling, feature extraction, the digit classifier's training)."""
from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "sample"):
    """A tqdm bar on stderr for a stage that takes more than a moment (a disabled bar when `enabled` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
