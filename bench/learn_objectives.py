"""The learning table: every objective trained at an equal budget on the 2-D toy and on MNIST, its 1- and 2-step
samples scored (sliced Wasserstein on the toy; the digit classifier's label match and Frechet distance on MNIST), next
to flow matching with 1, 2 and 50 Euler steps.

    python bench/learn_objectives.py --suite toy                 # 6 runs, a few minutes each on 2 CPU cores
    python bench/learn_objectives.py --suite mnist               # 6 runs, 10-40 min each on 2 free cores (TVM,
                                                                 # through the JVP: ~40 min on 1 thread)
    python bench/learn_objectives.py --suite mnist --objectives scm alphaflow   # some rows only
    python bench/learn_objectives.py --table                     # rewrite docs/objectives.md's tables from the rows

Each run is `python -m meanflow train --preset SUITE-OBJECTIVE --out RUNS/SUITE-OBJECTIVE` (the presets differ only
in their loss section: same network, data, optimizer, batch, steps; except mnist-scm, which continues the mnist-fm run
RUNS/mnist-fm at a lower learning rate, so train mnist-fm first); its eval.json and summary.json become one row
of docs/objectives_learning.json (merged with the rows already there, keyed by preset), and the two generated blocks
of docs/objectives.md are rewritten from all rows: the compact table between `<!-- objectives-table:start -->` and
`<!-- objectives-table:end -->`, the full tables with commands, machines and findings between `<!-- learning:start -->`
and `<!-- learning:end -->`. The rest of that page is written by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "docs" / "objectives_learning.json"
TABLE = REPO / "docs" / "objectives.md"
OBJECTIVES = ("fm", "meanflow", "imf", "scm", "alphaflow", "tvm")
# presets that continue another preset's run (meanflow/training/presets.py STARTS_FROM): started from RUNS/<that preset>
STARTS_FROM = {"mnist-scm": "mnist-fm"}
TITLES = {"fm": "flow matching (Euler)", "meanflow": "MeanFlow", "imf": "iMF", "scm": "sCM (TrigFlow)",
          "alphaflow": "alpha-Flow", "tvm": "TVM"}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train(preset: str, runs: Path, threads: int, extra: list[str]) -> dict:
    out = runs / preset
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = STARTS_FROM.get(preset)
    if start:
        if not (runs / start / "checkpoints").is_dir():
            raise SystemExit(f"{preset} continues the {start} run: train it first (it is looked for in {runs / start})")
        extra = [f"train.init_from={runs / start}", *extra]
    cmd = [sys.executable, "-m", "meanflow", "train", "--preset", preset, "--out", str(out),
           "--set", f"train.threads={threads}", "--set", "train.progress=false"] + [a for s in extra for a in
                                                                                   ("--set", s)]
    shown = " ".join(["meanflow"] + cmd[3:])
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{preset} failed (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "eval.json").read_text())
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"preset": preset, "command": shown, "wall_s": round(wall, 1), "train_wall_s": summary["wall_s"],
            "samples_per_s": summary["samples_per_s"], "threads": summary["threads"], "metrics": metrics,
            "final_loss": losses[-1]["loss"], "config": json.loads((out / "config.json").read_text())}


def load_rows() -> dict:
    return json.loads(ROWS.read_text()) if ROWS.exists() else {"rows": {}}


def save_row(row: dict) -> dict:
    """Merge one row into the JSON under a lock: several suites may run at once (toy and mnist), each adding rows."""
    import fcntl

    with open(ROWS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_rows()
        data["rows"][row["preset"]] = row
        tmp = ROWS.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(ROWS)
    return data


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_table(data: dict) -> str:
    """Rewrite both generated blocks of docs/objectives.md from the rows; returns the full tables."""
    body = learning_tables(data)
    replace_block(TABLE, "learning", body)
    replace_block(TABLE, "objectives-table", compact_table(data["rows"]))
    return body


def learning_tables(data: dict) -> str:
    """The full tables (learning markers): per data set one line per objective and step count, with commands,
    machines and the findings."""
    rows = data["rows"]
    lines = ["Written by `python bench/learn_objectives.py --table` from `docs/objectives_learning.json` (every "
             "number below is in that file, with the run's full config, command, commit and machine).", ""]
    for suite, metric in (("toy", "sw"), ("mnist", "mnist")):
        present = [o for o in OBJECTIVES if f"{suite}-{o}" in rows]
        missing = [f"{suite}-{o}" for o in OBJECTIVES if f"{suite}-{o}" not in rows]
        if suite == "toy":
            lines += ["### 2-D checkerboard (MLP 256 x 4, 3000 steps at batch 256)", "",
                      "Sliced Wasserstein SW_2 of 5000 samples to held-out data (lower is better; two independent "
                      "data draws give the floor).", "",
                      "| objective | NFE | SW_2 | floor | train s | command |", "|---|---|---|---|---|---|"]
        else:
            lines += ["### MNIST (DiT-Tiny/4, 2500 steps at batch 32; class-conditional)", "",
                      "1000 samples, 100 per class, scored by the digit classifier: label match (the predicted class "
                      "is the conditioning label; higher is better) and the Frechet distance of its features to "
                      "held-out real digits (FD; lower is better; real train vs test gives the floor).", "",
                      "| objective | NFE | label match | FD | floor FD | train s | command |",
                      "|---|---|---|---|---|---|---|"]
        for o in present:
            row = rows[f"{suite}-{o}"]
            m = row["metrics"]
            nfe_per_step = 2 if o == "fm" and row["config"]["loss"].get("sample_cfg", 1.0) != 1.0 else 1
            for key in sorted((k for k in m if k.endswith("step")), key=lambda k: int(k[:-4])):
                steps = int(key[:-4])
                name = f"{TITLES[o]}, {steps} step{'s' if steps > 1 else ''}"
                cmd = f"`{row['command']}`" if key == "1step" else ""
                if suite == "toy":
                    lines.append(f"| {name} | {steps * nfe_per_step} | {fmt(m[key]['sw'], 4)} | "
                                 f"{fmt(m['reference']['sw_data_vs_data'], 4)} | {row['train_wall_s']:.0f} | {cmd} |")
                else:
                    lines.append(f"| {name} | {steps * nfe_per_step} | {fmt(m[key]['label_match'])} | "
                                 f"{fmt(m[key]['fd'], 1)} | {fmt(m['reference']['fd_real_train_vs_test'], 1)} | "
                                 f"{row['train_wall_s']:.0f} | {cmd} |")
        continued = [f"{p} continues the {STARTS_FROM[p]} run (train.init_from): its train s and steps come on top "
                     f"of that run's" for p in (f"{suite}-{o}" for o in present) if p in STARTS_FROM]
        if continued:
            lines += ["", "; ".join(continued) + "."]
        if missing:
            lines += ["", f"Not run yet: {', '.join(missing)} (`python bench/learn_objectives.py --suite {suite} "
                          f"--objectives {' '.join(m.split('-', 1)[1] for m in missing)}`)."]
        lines.append("")
    lines += ["Machines and commits of the rows: " + "; ".join(
        sorted({f"{r['preset']}: {r['machine']} @ {r['commit']}" for r in rows.values()})), ""]
    notes = data.get("notes", "")
    if notes:
        lines += ["### Findings", "", notes, ""]
    return "\n".join(lines).rstrip("\n")


def replace_block(path: Path, name: str, body: str) -> None:
    """Rewrite what lies between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path` (both must be there)."""
    text = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    path.write_text(text[:text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end):])


def compact_table(rows: dict) -> str:
    """The compact table of docs/objectives.md (objectives-table markers): one line per objective and step count."""
    lines = ["Equal budget per data set (the `toy-OBJ` / `mnist-OBJ` presets: same network, optimizer, batch and "
             "steps); toy: SW_2 to held-out data (lower is better), MNIST: the digit classifier's label match "
             "(higher) and FD (lower). From `docs/objectives_learning.json`; commands, machines and findings in "
             "[the learning runs in detail](#the-learning-runs-in-detail).", "",
             "| objective | steps (NFE) | toy SW_2 | MNIST label match | MNIST FD |", "|---|---|---|---|---|"]
    floor: dict[tuple[str, int], list[float]] = {}  # (name, digits) -> each run's own floor
    for o in OBJECTIVES:
        toy, mnist = rows.get(f"toy-{o}"), rows.get(f"mnist-{o}")
        keys = sorted({k for r in (toy, mnist) if r for k in r["metrics"] if k.endswith("step")},
                      key=lambda k: int(k[:-4]))
        for key in keys:
            steps = int(key[:-4])
            nfe = steps * (2 if o == "fm" and mnist and mnist["config"]["loss"].get("sample_cfg", 1.0) != 1.0 else 1)
            sw = fmt(toy["metrics"][key]["sw"], 3) if toy and key in toy["metrics"] else "-"
            lm = fmt(mnist["metrics"][key]["label_match"]) if mnist and key in mnist["metrics"] else "not run"
            fd = fmt(mnist["metrics"][key]["fd"], 1) if mnist and key in mnist["metrics"] else "not run"
            nfe_text = f"{steps}" if nfe == steps else f"{steps} ({steps} toy, {nfe} MNIST with CFG)"
            lines.append(f"| {TITLES[o]} | {nfe_text} | {sw} | {lm} | {fd} |")
        for r in (toy, mnist):
            if r:
                ref = r["metrics"]["reference"]
                if "sw_data_vs_data" in ref:
                    floor.setdefault(("toy SW_2", 3), []).append(ref["sw_data_vs_data"])
                else:
                    floor.setdefault(("MNIST FD", 1), []).append(ref["fd_real_train_vs_test"])
    if floor:
        # each run measures its own floor (its classifier and draws): a range where the runs differ
        parts = []
        for (name, digits), values in sorted(floor.items()):
            lo, hi = (f"{v:.{digits}f}" for v in (min(values), max(values)))
            parts.append(f"{name} {lo}" + (f"-{hi}" if lo != hi else ""))
        lines += ["", "Floors (data against data, measured by each run): " + ", ".join(parts) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("toy", "mnist"), help="which presets (toy-* or mnist-*)")
    ap.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    ap.add_argument("--runs", default="runs/learn", help="run directories (default runs/learn/PRESET)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run (train.threads)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides for every run (tuning; rows made so are marked as not the preset)")
    ap.add_argument("--no-save", action="store_true", help="print the rows, do not merge them into the JSON")
    ap.add_argument("--table", action="store_true",
                    help="only rewrite docs/objectives.md's generated tables from the saved rows")
    args = ap.parse_args(argv)
    data = load_rows()
    if not args.table:
        if not args.suite:
            ap.error("--suite is required (or --table)")
        machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} torch threads, " \
                  f"python {platform.python_version()}"
        for o in args.objectives:
            row = train(f"{args.suite}-{o}", Path(args.runs), args.threads, args.set)
            row.update(machine=machine, commit=git_commit(), overrides=args.set)
            keys = [k for k in row["metrics"] if k.endswith("step")]
            print(json.dumps({k: row["metrics"][k] for k in keys}), f"{row['train_wall_s']} s", flush=True)
            if not args.no_save and not args.set:
                data = save_row(row)
    print(write_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
