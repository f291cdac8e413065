"""Progress bars for stages that take more than a moment (evaluation, the digit classifier, sampling)."""
from __future__ import annotations


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "sample"):
    """A tqdm bar on stderr (a disabled bar when `enabled` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
