"""Turn folders of benchmark result files into REPORT.md, plots, docs/performance.md and the README's summary table.

    python bench/report.py bench/results/h200-2026-11-30                     # -> REPORT.md, attention.png, step.png
    python bench/report.py bench/results/h100-a bench/results/h200-b --readme README.md  # several cards

Provenance first. Every result file is labelled with the commit it was measured at (its "meta": see
bench/common.py): "<commit>" when the tree was that commit, "<commit> + uncommitted changes" when it was not (git's
dirty flag, or a source digest that differs from the commit's). Files written before result files carried a commit
are labelled "commit unknown / NOTES: <commit>" from the folder's PROVENANCE.json (which copies what the folder's
NOTES.md says), or "commit unknown". Rows of different labels never share a table: each table is preceded by the
commit, files and device its rows come from. Summary tables that collect rows across files (targets met / missed,
like-for-like ratios) name the file and the commit on every line.

Ratios are like for like: a step's "vs FM" divides by the flow-matching step of the SAME mode (eager by eager, graphed
by graphed, compiled by compiled), from the same file, model and batch; "best of each" compares each backend's fastest
mode, naming it. Memory: "step growth" is what a step allocates over what was allocated before it (activations and
temporaries: parameters, AdamW state and the previous step's gradients are excluded; graphed rows add the graph's
pool); "total peak" is everything the allocator held at the step's peak (new files only).

With --readme, two generated blocks are rewritten from the same files: the full performance section of
docs/performance.md (next to the README, or --performance PATH) between the markers `<!-- perf:start -->` and
`<!-- perf:end -->`, and the README's one summary table (one line per target over every card and file) between
`<!-- perf-summary:start -->` and `<!-- perf-summary:end -->`. Links are written relative to the page they are in.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ("step", "attention", "target", "block", "block_ops", "host", "overhead", "forward")
MODES = ("eager", "graphed", "compiled")


# ------------------------------------------------------------------------------------------------ provenance
@dataclass
class ResultFile:
    path: Path
    family: str
    meta: dict
    rows: list[dict]
    label: str = ""        # the commit label rows are grouped by
    detail: str = ""       # one line: how the label was established
    known: bool = False    # the file itself names its commit

    @property
    def device(self) -> str:
        gpu = self.meta.get("gpu") or {}
        return gpu.get("name") or self.meta.get("device") or "unknown device"

    @property
    def versions(self) -> str:
        parts = [f"torch {self.meta['torch']}" if self.meta.get("torch") else None,
                 f"triton {self.meta['triton']}" if self.meta.get("triton") else None,
                 f"CUDA {self.meta['cuda']}" if self.meta.get("cuda") else None,
                 f"cuDNN {self.meta['cudnn']}" if self.meta.get("cudnn") else None]
        return ", ".join(p for p in parts if p)


@functools.lru_cache(maxsize=None)
def _commit_digest(commit: str) -> str | None:
    from bench.common import commit_digest

    return commit_digest(commit)


def label_file(rf: ResultFile, folder: Path) -> None:
    """Set rf.label / detail / known from the file's metadata, else the folder's PROVENANCE.json."""
    meta = rf.meta
    commit = meta.get("commit")
    if commit:
        short = commit[:7] if re.fullmatch(r"[0-9a-f]{7,40}", commit) else commit
        changes = []
        if meta.get("dirty"):
            changes.append("modified: " + ", ".join(meta.get("dirty_files") or []))
        digest, expected = meta.get("source_digest"), _commit_digest(commit)
        if digest and expected and digest != expected:
            changes.append("source digest differs from the commit's")
        check = ("source digest verified against the commit" if digest and expected == digest else
                 "source digest not checked (commit not in this repository)" if digest else "no source digest")
        rf.known = True
        rf.label = short + (" + uncommitted changes" if changes else "")
        rf.detail = f"commit {commit} ({meta.get('commit_source', 'git')}; {check}" + \
                    (f"; {'; '.join(changes)}" if changes else "") + ")"
        if meta.get("stamped"):
            rf.detail += "; metadata stamped after the run"
        return
    prov_path = folder / "PROVENANCE.json"
    entry = {}
    if prov_path.exists():
        entry = json.loads(prov_path.read_text()).get("files", {}).get(rf.path.name, {})
    if entry.get("notes_commit"):
        rf.label = f"commit unknown / NOTES: {entry['notes_commit']}"
        rf.detail = "the file has no metadata; " + entry.get("detail", "the folder's NOTES.md names this commit")
    else:
        rf.label = "commit unknown"
        rf.detail = "the file has no metadata" + (f"; {entry['detail']}" if entry.get("detail") else "")


def load_folder(folder: Path) -> list[ResultFile]:
    """Every `<family>.json` / `<family>_run*.json` of the folder, labelled (rows with an error or a time only)."""
    out = []
    for path in sorted(folder.glob("*.json")):
        family = next((f for f in FAMILIES if re.fullmatch(rf"{f}(_run.*)?\.json", path.name)), None)
        if family is None:
            continue
        data = json.loads(path.read_text())
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else \
            {k: v for k, v in data.items() if k not in ("rows", "summary")}
        rows = [dict(r, _file=f"{folder.name}/{path.name}") for r in data.get("rows", [])]
        rf = ResultFile(path, family, meta, rows)
        label_file(rf, folder)
        for r in rf.rows:
            r["_label"] = rf.label
        out.append(rf)
    return out


def by_label(files: list[ResultFile]) -> "OrderedDict[str, list[ResultFile]]":
    groups: OrderedDict[str, list[ResultFile]] = OrderedDict()
    for rf in files:
        groups.setdefault(rf.label, []).append(rf)
    return groups


def group_heading(files: list[ResultFile], folder: Path | None = None) -> str:
    """The line above a table: its commit label, device, versions and files (never two commits in one table)."""
    rf = files[0]
    names = ", ".join(f"`{folder / f.path.name}`" if folder else f"`{f.path.name}`" for f in files)
    where = ""
    devices = sorted({f.device for f in files})
    return (f"*Measured at **{rf.label}** on {' / '.join(devices)}" + (f" ({rf.versions})" if rf.versions else "")
            + f"; rows from {where}{names}.*")


def provenance_section(files: list[ResultFile]) -> str:
    lines = [[f"`{rf.path.name}`", rf.family, rf.label, rf.device, rf.meta.get("date", "-"), rf.detail]
             for rf in files]
    return table(["file", "benchmark", "commit", "device", "date", "how the commit is known"], lines)


# ------------------------------------------------------------------------------------------------ formatting
def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def short_error(error: str) -> str:
    if "out of memory" in error.lower():
        return "out of memory"
    return error.replace("|", "/")[:90]


def span(values: list[float], digits=2, unit="x") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}{unit}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else \
        f"{lo:.{digits}f}-{hi:.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------ step rows
def mode_of(r: dict) -> str:
    return r.get("mode") or ("graphed" if r.get("cuda_graph") else "eager")


def case_of(r: dict) -> str:
    """'flow matching', 'autograd', 'explicit', 'fused', 'finite difference (eps ...)'."""
    if r["objective"] == "flow_matching":
        return "flow matching"
    if r["backend"] == "finite_difference":
        return f"finite difference (eps {r.get('fd_eps', '?')})"
    return r["backend"]


def step_rows(files: list[ResultFile]) -> list[dict]:
    """Step rows with mode, case and like-for-like ratios recomputed from the rows of the same file."""
    out = []
    for rf in files:
        rows = [dict(r, mode=mode_of(r), case=case_of(r)) for r in rf.rows if r.get("bench", "step") == "step"]
        fm = {(r["model"], r.get("batch"), r["mode"]): r for r in rows
              if r["objective"] == "flow_matching" and r.get("ms")}
        for r in rows:
            base = fm.get((r["model"], r.get("batch"), r["mode"]))
            if r.get("ms") and base:
                r["vs_fm"] = r["ms"] / base["ms"]
                if r.get("peak_mem_mb") and base.get("peak_mem_mb") and _mem_valid(r) and _mem_valid(base):
                    r["mem_vs_fm"] = r["peak_mem_mb"] / base["peak_mem_mb"]
                if r.get("total_peak_mb") and base.get("total_peak_mb"):
                    r["total_vs_fm"] = r["total_peak_mb"] / base["total_peak_mb"]
        out += rows
    return out


def _mem_valid(r: dict) -> bool:
    """Early graphed rows missed the graph pool's memory (no peak_mem_method): not a valid figure."""
    return r["mode"] != "graphed" or bool(r.get("peak_mem_method"))


def _time_cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r.get("ms"):
        cell = fmt(r["ms"], 1)
        if r.get("runs") == 1 or r.get("ms_p20") == r.get("ms_p80") == r["ms"]:
            return cell + " (1 run)"
        if r.get("ms_p20") is not None and r.get("ms_p80") is not None:
            cell += f" ({r['ms_p20']:.1f}-{r['ms_p80']:.1f})"
        return cell
    if r.get("error"):
        return short_error(r["error"])
    return r.get("status", "no time")


def step_table(rows: list[dict]) -> str:
    """One line per (model, batch, case, guidance), one column pair per mode present: ms (p20-p80) and vs FM."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    keys = list(dict.fromkeys((r["model"], r.get("batch"), r["case"], r["guidance"]) for r in rows))
    by: dict = {}
    for r in rows:  # a key measured in two files of one commit (a re-run): the first file's row is shown
        by.setdefault((r["model"], r.get("batch"), r["case"], r["guidance"], r["mode"]), r)
    lines = []
    for model, batch, case, guidance in keys:
        line = [f"{model}, batch {batch}", case, guidance]
        for m in modes:
            r = by.get((model, batch, case, guidance, m))
            line += [_time_cell(r), fmt(r.get("vs_fm")) + "x" if r and r.get("vs_fm") else "-"]
        lines.append(line)
    header = ["model", "case", "guidance"]
    for m in modes:
        header += [f"{m} ms (p20-p80)", f"{m} / FM {m}"]
    return table(header, lines)


def memory_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if not r.get("ms") or r.get("peak_mem_mb") is None:
            continue
        growth = fmt(r["peak_mem_mb"], 0) if _mem_valid(r) else "not measured"
        lines.append([f"{r['model']}, batch {r.get('batch')}", r["case"], r["guidance"], r["mode"], growth,
                      fmt(r.get("mem_vs_fm")) + "x" if r.get("mem_vs_fm") else "-",
                      fmt(r.get("total_peak_mb"), 0) if r.get("total_peak_mb") else "not recorded",
                      fmt(r.get("total_vs_fm")) + "x" if r.get("total_vs_fm") else "-"])
    if not lines:
        return ""
    return table(["model", "case", "guidance", "mode", "step growth MB", "growth / FM same mode", "total peak MB",
                  "total / FM same mode"], lines)


def like_for_like(rows: list[dict]) -> list[dict]:
    """Per (commit label, model, batch, guidance): fused's speed-up over autograd and explicit in each mode, the best
    (fastest mode) of each backend, and the split of fused's gain over eager explicit into graphs and kernels. Rows
    of one commit may come from several files (the suite runs the capture of graphed autograd in its own process)."""
    out = []
    keys = dict.fromkeys((r["_label"], r["model"], r.get("batch"), r["guidance"]) for r in rows
                         if r["objective"] == "meanflow")
    by: dict = {}
    for r in rows:
        if r.get("ms"):
            by.setdefault((r["_label"], r["model"], r.get("batch"), r["guidance"], r["case"], r["mode"]), r)
    for label, model, batch, guidance in keys:
        get = lambda case, mode: by.get((label, model, batch, guidance, case, mode))  # noqa: E731
        mine = [r for r in rows if r["_label"] == label and r["model"] == model and r.get("batch") == batch]
        files = list(dict.fromkeys(r["_file"] for r in mine if r["guidance"] == guidance or
                                   r["objective"] == "flow_matching"))
        entry = {"file": ", ".join(files), "label": label, "model": model, "batch": batch, "guidance": guidance}
        for other, subject in (("autograd", "fused"), ("explicit", "fused"), ("autograd", "explicit")):
            for m in MODES:
                a, b = get(other, m), get(subject, m)
                if a and b:
                    entry[f"{other}/{subject} {m}"] = a["ms"] / b["ms"]
        best = {}
        tried = {r["mode"] for r in mine}
        for case in ("autograd", "explicit", "fused"):
            measured = [get(case, m) for m in MODES if get(case, m)]
            if measured:
                fastest = min(measured, key=lambda r: r["ms"])
                best[case] = fastest
                missing = sorted(tried - {r["mode"] for r in measured})
                entry[f"best {case}"] = f"{fastest['ms']:.1f} ms ({fastest['mode']}" + \
                    (f"; {', '.join(missing)}: no time" if missing else "") + ")"
                if missing:
                    entry[f"{case} modes without a time"] = missing
        for other in ("autograd", "explicit"):
            if other in best and "fused" in best:
                entry[f"best {other}/best fused"] = best[other]["ms"] / best["fused"]["ms"]
        ee, ge, gf = get("explicit", "eager"), get("explicit", "graphed"), get("fused", "graphed")
        if ee and ge and gf:
            entry["graphs: eager/graphed explicit"] = ee["ms"] / ge["ms"]
            entry["kernels: graphed explicit/graphed fused"] = ge["ms"] / gf["ms"]
        out.append(entry)
    return out


def like_for_like_table(entries: list[dict]) -> str:
    if not entries:
        return ""
    entries = [e for e in entries if any("/" in k for k in e if k != "file")]
    if not entries:
        return ""
    ratio_cols = [c for c in ([f"autograd/fused {m}" for m in MODES] + [f"explicit/fused {m}" for m in MODES] +
                              [f"autograd/explicit {m}" for m in MODES] +
                              ["best autograd/best fused", "best explicit/best fused",
                               "graphs: eager/graphed explicit", "kernels: graphed explicit/graphed fused"])
                  if any(c in e for e in entries)]
    text_cols = [c for c in ("best autograd", "best explicit", "best fused") if any(c in e for e in entries)]
    lines = [[f"{e['model']}, batch {e['batch']}", e["guidance"]] +
             [fmt(e.get(c)) + "x" if e.get(c) else "-" for c in ratio_cols] + [e.get(c, "-") for c in text_cols] +
             [", ".join(f"`{f}`" for f in e["file"].split(", ")) + f" ({e['label']})"] for e in entries]
    return table(["model", "guidance"] + ratio_cols + text_cols + ["files (commit)"], lines)


def tangent_error_table(files: list[ResultFile]) -> str:
    rows = [r for rf in files for r in rf.rows if r.get("bench") == "tangent_error"]
    if not rows:
        return ""
    lines = [[r["model"], r["dtype"], r["method"], r.get("fd_eps", "-"), r.get("tangent_rows"),
              fmt(r.get("rel_l2"), 4) if "rel_l2" in r else short_error(r.get("error", "?")),
              fmt(r.get("rel_max"), 4) if "rel_max" in r else "-"] for r in rows]
    return ("Tangent du/dt against torch.func.jvp in float64 (same network, inputs and tangent rows); relative L2 "
            "and max error over the tangent rows:\n\n" +
            table(["model", "dtype", "method", "eps", "rows", "rel. L2 error", "rel. max error"], lines))


def step_section(files: list[ResultFile], folder: Path | None = None, memory: bool = True) -> str:
    parts = []
    for _, group in by_label(files).items():
        rows = step_rows(group)
        if not rows:
            continue
        dtype = sorted({r.get("dtype", "?") for r in rows})
        parts.append(group_heading(group, folder) + f" Dtype {', '.join(dtype)}; ratio 0.25 (rows with r != t); "
                     "guidance on = kappa 0.5, omega 1.0.\n")
        parts.append(step_table(rows) + "\n")
        if memory:
            mem = memory_table(rows)
            if mem:
                parts.append(mem + "\n")
        err = tangent_error_table(group)
        if err:
            parts.append(err + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ attention
ATTN_ORDER = ["fused_fwd_jvp", "sdpa_flash_fwd", "sdpa_cudnn_fwd", "sdpa_default_fwd", "math_jvp", "fused_bwd",
              "sdpa_flash_bwd", "sdpa_cudnn_bwd"]
ATTN_NAMES = {"fused_fwd_jvp": "fused fwd+JVP", "sdpa_flash_fwd": "SDPA flash (FA2) fwd, forced",
              "sdpa_cudnn_fwd": "SDPA cuDNN fwd, forced",
              "sdpa_default_fwd": "SDPA default backend fwd (not forced)", "math_jvp": "math JVP",
              "fused_bwd": "fused bwd", "sdpa_flash_bwd": "SDPA flash (FA2) bwd", "sdpa_cudnn_bwd": "SDPA cuDNN bwd"}


def attention_section(rows: list[dict], readme: bool = False) -> str:
    """The dense table (one line per shape; a column per provider present), then (not in the README) one table per
    other case (keypad30, gqa), then the variants table (split vs padded head dims, the Hopper levers) where a run
    timed variants. '*' marks a single sample (p20 = p80 = median)."""
    rows = [r for r in rows if not r.get("causal")]
    plain = [r for r in rows if r.get("variant", "default") == "default"]
    dense = [r for r in plain if r.get("case", "dense") == "dense"]
    parts = [dense_attention_table(dense, readme)]
    if not readme:
        for case in sorted({r.get("case", "dense") for r in plain} - {"dense"}):
            parts.append(f"Case `{case}`:\n\n" + case_attention_table([r for r in plain if r.get("case") == case]))
    if any(r.get("variant", "default") != "default" for r in rows):
        parts.append("A/B switches of the fused kernels (bench_attention.py --variants; split / padded < 1: the split "
                     "head dim is faster; lever / default < 1: the lever is faster):\n\n"
                     + variant_attention_table([r for r in rows if r.get("case", "dense") == "dense"]))
    return "\n\n".join(p for p in parts if p)


def _ms_cell(r: dict) -> tuple[str, bool]:
    """(cell, single sample?) for a row's median: ms, its error, or '-'."""
    if not r:
        return "-", False
    if not r.get("ms"):
        return short_error(r.get("error", "-")), False
    single = r.get("ms_p20") == r.get("ms_p80")
    return fmt(r["ms"], 3) + ("*" if single else ""), single


def dense_attention_table(rows: list[dict], readme: bool = False) -> str:
    providers = [p for p in ATTN_ORDER if any(r["provider"] == p for r in rows)]
    if not readme:
        providers += sorted({r["provider"] for r in rows} - set(providers) - {"reference_jvp", "fused_fwd"})
    by = {(r["dtype"], r["D"], r["N"], r["provider"]): r for r in rows}
    keys = sorted({(d, D, N) for d, D, N, _ in by})
    lines, single = [], False
    for dtype, d, n in keys:
        get = lambda p: by.get((dtype, d, n, p), {})  # noqa: E731
        fused = get("fused_fwd_jvp")
        if not fused.get("ms"):
            continue
        line = [f"{dtype} D{d} N{n} (B{fused['B']} H{fused['H']})", fmt(fused.get("tflops"), 0)]
        for p in providers:
            cell, one = _ms_cell(get(p))
            single |= one
            line.append(cell)
        flash, math = get("sdpa_flash_fwd"), get("math_jvp")
        ratio = fused["ms"] / flash["ms"] if flash.get("ms") else None
        line.append(fmt(ratio) + "x" + (" (over 2.0x)" if ratio and ratio > 2.0 else "") if ratio else "-")
        for other in ("sdpa_cudnn_fwd", "sdpa_default_fwd"):
            if other in providers:
                line.append(fmt(fused["ms"] / get(other)["ms"]) + "x" if get(other).get("ms") else "-")
        line.append(fmt(math["ms"] / fused["ms"], 1) + "x" if math.get("ms") else "-")
        for bwd in ("sdpa_flash_bwd", "sdpa_cudnn_bwd"):
            if bwd in providers:
                fb, ob = get("fused_bwd"), get(bwd)
                line.append(fmt(fb["ms"] / ob["ms"]) + "x" if fb.get("ms") and ob.get("ms") else "-")
        line.append(f"{fmt(fused.get('peak_mem_mb'), 0)} / {fmt(math.get('peak_mem_mb'), 0)}")
        lines.append(line)
    if not lines:
        return ""
    header = ["shape", "fused eff. TFLOP/s (12 N^2 D per head)"] + [f"{ATTN_NAMES.get(p, p)} ms" for p in providers]
    header += ["fused / flash fwd (target <= 2.0x; Hopper target: 1.75x at D 64, 1.85x at D 128)"]
    header += [f"fused / {ATTN_NAMES[o].split(' fwd')[0]}" for o in ("sdpa_cudnn_fwd", "sdpa_default_fwd")
               if o in providers]
    header += ["math JVP / fused"]
    header += [f"fused bwd / {ATTN_NAMES[b].split(' bwd')[0]} bwd" for b in ("sdpa_flash_bwd", "sdpa_cudnn_bwd")
               if b in providers]
    header += ["peak MB fused / math"]
    note = ("\n\n\\* a single timed run (p20 = median = p80): not a distribution." if single else "")
    return table(header, lines) + note


def case_attention_table(rows: list[dict]) -> str:
    """A masked or GQA case: ms per provider (its base name) and the fused rows' ratios to every other provider."""
    order = [p for p in ATTN_ORDER + sorted({r["base_provider"] for r in rows}) if p != "reference_jvp"]
    providers = list(dict.fromkeys(p for p in order if any(r.get("base_provider") == p for r in rows)))
    by = {(r["dtype"], r["D"], r["N"], r["base_provider"]): r for r in rows}
    lines = []
    for dtype, d, n in sorted({k[:3] for k in by}):
        get = lambda p: by.get((dtype, d, n, p), {})  # noqa: E731
        any_row = next(r for k, r in by.items() if k[:3] == (dtype, d, n))
        line = [f"{dtype} D{d} N{n} (B{any_row['B']} H{any_row['H']}" + (f" Hkv{any_row['Hkv']}" if "Hkv" in any_row
                                                                         else "") + ")"]
        line += [_ms_cell(get(p))[0] for p in providers]
        for fused, others in (("fused_fwd_jvp", ("sdpa_flash_fwd", "sdpa_efficient_fwd", "sdpa_cudnn_fwd")),
                              ("fused_bwd", ("sdpa_flash_bwd", "sdpa_efficient_bwd", "sdpa_cudnn_bwd"))):
            for other in others:
                if other in providers:
                    a, b = get(fused), get(other)
                    line.append(fmt(a["ms"] / b["ms"]) + "x" if a.get("ms") and b.get("ms") else "-")
        lines.append(line)
    header = ["shape"] + [f"{ATTN_NAMES.get(p, p)} ms" for p in providers]
    for fused, others in (("fused fwd+JVP", ("sdpa_flash_fwd", "sdpa_efficient_fwd", "sdpa_cudnn_fwd")),
                          ("fused bwd", ("sdpa_flash_bwd", "sdpa_efficient_bwd", "sdpa_cudnn_bwd"))):
        header += [f"{fused} / {other}" for other in others if other in providers]
    return table(header, lines)


def variant_attention_table(rows: list[dict]) -> str:
    """Per shape and fused provider: the default kernels' ms, each variant's ms and its ratio to the default."""
    variants = [v for v in ("padded", "tma", "persistent") if any(r.get("variant") == v for r in rows)]
    variants += sorted({r.get("variant", "default") for r in rows} - set(variants) - {"default"})
    by = {(r["dtype"], r["D"], r["N"], r["base_provider"], r.get("variant", "default")): r for r in rows}
    lines = []
    for dtype, d, n, p in sorted({k[:4] for k in by if k[4] != "default"}):
        base = by.get((dtype, d, n, p, "default"), {})
        ref = base or next(r for k, r in by.items() if k[:4] == (dtype, d, n, p))
        line = [f"{dtype} D{d} N{n} (B{ref['B']} H{ref['H']})", p,
                _ms_cell(base)[0], fmt(base.get("tflops"), 0)]
        for v in variants:
            r = by.get((dtype, d, n, p, v), {})
            # padded: the split (default) kernels over the padded ones (the split's target); a lever: lever over default
            num, den = (base, r) if v == "padded" else (r, base)
            line += [_ms_cell(r)[0], fmt(num["ms"] / den["ms"]) + "x" if num.get("ms") and den.get("ms") else "-"]
        lines.append(line)
    header = ["shape", "provider", "default ms", "default eff. TFLOP/s"]
    for v in variants:
        header += [f"{v} ms", "split / padded (target <= 0.75x fwd+JVP at D 72)" if v == "padded"
                   else f"{v} / default"]
    return table(header, lines)


def attention_sections(files: list[ResultFile], folder: Path | None = None, readme: bool = False) -> str:
    parts = []
    for _, group in by_label(files).items():
        rows = [r for rf in group for r in rf.rows if r.get("ms") is not None or r.get("error")]
        if readme:
            rows = [r for r in rows if r.get("dtype") == "bf16"]
        if rows:
            parts.append(group_heading(group, folder) + "\n\n" + attention_section(rows, readme) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ target op
def _bytes_v2(r: dict) -> int | None:
    """The current byte model (bench_target.traffic) for a row measured with the earlier one."""
    try:
        import torch

        from bench.bench_target import DTYPES, traffic
    except Exception:  # noqa: BLE001 - the report must work without the benchmark's imports
        return None
    return traffic(tuple(r["shape"]), DTYPES[r["dtype"]], r["mode"])["bytes"] if torch else None


def target_section(rows: list[dict]) -> str:
    by = {(tuple(r["shape"]), r["dtype"], r["mode"], r["provider"]): r for r in rows}
    lines, old_model = [], False
    for (shape, dtype, mode, provider), r in by.items():
        if provider != "native" or not r.get("ms"):
            continue
        eager, copy = by.get((shape, dtype, mode, "torch"), {}), by.get((shape, dtype, mode, "copy"), {})
        dev = r.get("device_ms")
        if r.get("byte_model"):
            frac = f"{100 * r['frac_of_copy']:.0f}%"
            dfrac = f"{100 * r['device_frac_of_copy']:.0f}%" if r.get("device_frac_of_copy") else "-"
            dread = f"{100 * r['device_frac_of_read']:.0f}%" if r.get("device_frac_of_read") else \
                (f"{100 * r['frac_of_read']:.0f}% (call)" if r.get("frac_of_read") else "-")
        else:
            # Earlier rows: the copy moved bytes_accessed (with the residual round trip); re-count the op's bytes
            # with the current model against that measured copy bandwidth.
            old_model = True
            v2 = _bytes_v2(r)
            frac = f"{100 * r['gbps'] / copy['gbps']:.0f}%" if copy.get("gbps") else "-"
            dfrac = f"{100 * r['device_frac_of_copy']:.0f}%" if r.get("device_frac_of_copy") else "-"
            if v2 and dev and copy.get("device_gbps"):
                dfrac += f" (re-counted: {100 * v2 / dev / 1e6 / copy['device_gbps']:.0f}%)"
            dread = "not measured"
        lines.append(["x".join(map(str, shape)), dtype, mode, fmt(r["ms"], 4), fmt(eager.get("ms"), 4),
                      fmt(eager["ms"] / r["ms"]) + "x" if eager.get("ms") else "-", frac,
                      fmt(dev * 1e3, 1) if dev else "-",
                      fmt(eager["device_ms"] / dev) + "x" if dev and eager.get("device_ms") else "-",
                      fmt(r.get("device_gbps"), 0), dfrac, dread])
    note = ("Call by call (do_bench: host launch cost included) and on the device alone (replayed from a CUDA graph "
            "over input copies larger than L2: HBM-bound, no host cost). 'of copy' compares with a device-to-device "
            "copy moving the byte count, 'of read' with a read-only pass over it (bench/bench_target.py explains the "
            "byte model).")
    if old_model:
        note += (" These rows were measured with the earlier byte model, which counted the residual that the forward "
                 "writes and the backward reads back (2 B n elements) as HBM traffic and sized the copy by it; at "
                 "these sizes the residual stays in L2, which is how fwd+bwd rows exceeded 100% of the copy. "
                 "'re-counted' divides the current model's bytes (inputs read once, outputs written once) by the "
                 "same measured time, against the measured copy bandwidth.")
    return note + "\n\n" + table(["shape", "dtype", "pass", "native ms", "eager ms", "speedup", "of copy",
                                  "device us", "device speedup", "device GB/s", "device: of copy",
                                  "device: of read"], lines)


def target_sections(files: list[ResultFile], folder: Path | None = None) -> str:
    parts = []
    for _, group in by_label(files).items():
        rows = [r for rf in group for r in rf.rows]
        if rows:
            parts.append(group_heading(group, folder) + "\n\n" + target_section(rows) + "\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ blocks
def block_section(rows: list[dict]) -> str:
    lines = [[r["model"], r["provider"], r["kt"], fmt(r.get("ms"), 3), fmt(r.get("ratio_to_primal")) + "x",
              fmt(r.get("peak_mem_mb"), 0)] for r in rows if r.get("ms")]
    return table(["block", "provider", "tangent rows", "ms fwd(+JVP)+bwd", "vs primal", "peak MB"], lines)


def block_ops_section(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by[(r.get("model", r.get("shape")), r["op"], r["kt"], r["pass"], r["provider"])] = r
    lines = []
    for (model, op, kt, kind, provider), r in by.items():
        if provider != "fused":
            continue
        eager = by.get((model, op, kt, kind, "eager"), {})
        auto = by.get((model, op, kt, kind, "autograd"), {})
        lines.append([model, op, kt, kind, fmt(r["ms"], 3), fmt(eager.get("ms"), 3), fmt(auto.get("ms"), 3),
                      fmt(eager["ms"] / r["ms"]) + "x" if eager.get("ms") else "-"])
    return table(["model", "op", "kt", "pass", "fused ms", "eager ms", "autograd JVP ms", "fused speedup vs eager"],
                 lines)


def generic_section(rows: list[dict], max_cols: int = 12) -> str:
    """Any rows: one column per key (the first max_cols keys seen), floats to 3 significant digits."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if not k.startswith("_")][:max_cols]
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v).replace("|", "/"))  # noqa: E731
    return table(keys, [[cell(r.get(k)) for k in keys] for r in rows])


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Check:
    """One target checked against one file: its values, each under a part label (a model and batch, a head dim)."""

    target: str
    file: str = ""
    label: str = ""
    unit: str = "x"
    parts: "OrderedDict[str, list[tuple[float, bool]]]" = field(default_factory=OrderedDict)

    @property
    def met(self) -> list[bool]:
        return [ok for values in self.parts.values() for _, ok in values]

    @property
    def values(self) -> list[float]:
        return [v for values in self.parts.values() for v, _ in values]


def _check(checks: dict, target: str, part: str, value: float, ok: bool, file: str, label: str, unit="x") -> None:
    c = checks.setdefault((target, file), Check(target, file=file, label=label, unit=unit))
    c.parts.setdefault(part, []).append((value, ok))


def _name(rf: ResultFile) -> str:
    return f"{rf.path.parent.name}/{rf.path.name}"


def _short(model: str, batch) -> str:
    return f"{model.replace('DiT-', '')} b{batch}"


def _fwd_jvp_over_flash_check(dtype, d, n, r, by):
    """Fused forward + JVP over FA2's forward: <= 1.75x at D 64, <= 1.85x at D 128 (bf16)."""
    limit = {64: 1.75, 128: 1.85}.get(d)
    flash = by.get((dtype, d, n, "sdpa_flash_fwd"))
    if limit and flash and dtype == "bf16":
        v = r["ms"] / flash["ms"]
        return f"attention fwd+JVP <= {limit}x SDPA flash (FA2) fwd at D {d} (Hopper target)", v, v <= limit, "x"
    return None


def _fwd_jvp_tflops_check(dtype, d, n, r, by):
    """>= 550 effective TFLOP/s (12 N^2 D a head) at N >= 2048 (bf16)."""
    if n >= 2048 and dtype == "bf16" and r.get("tflops"):
        return "attention fwd+JVP >= 550 eff. TFLOP/s at N >= 2048 (Hopper target)", r["tflops"], r["tflops"] >= 550, " TFLOP/s"
    return None


def _split_head_dim_fwd_check(dtype, d, n, r, by):
    """Split head dim (default kernels) over the padded kernels: fwd+JVP <= 0.75x at D 72."""
    padded = by.get((dtype, d, n, "fused_fwd_jvp_padded"))
    if padded and d == 72:
        v = r["ms"] / padded["ms"]
        return "attention fwd+JVP at D 72 <= 0.75x the padded kernel (Hopper target)", v, v <= 0.75, "x"
    return None


def _split_head_dim_bwd_check(dtype, d, n, r, by):
    """Backward at a split head dim no slower than the padded kernel's."""
    split, padded = by.get((dtype, d, n, "fused_bwd")), by.get((dtype, d, n, "fused_bwd_padded"))
    if split and padded:
        v = split["ms"] / padded["ms"]
        return "attention bwd at a split head dim <= 1.0x the padded kernel (Hopper target)", v, v <= 1.0, "x"
    return None


ATTN_HOPPER_CHECKS = (_fwd_jvp_over_flash_check, _fwd_jvp_tflops_check, _split_head_dim_fwd_check, _split_head_dim_bwd_check)


def targets(files: list[ResultFile]) -> list[Check]:
    """The project's speed targets (the README's), checked against every GPU file that has the rows: one line per
    target and file, the value per model (or head dim) in it. CPU files are not judged against GPU targets."""
    checks: dict = OrderedDict()
    files = [rf for rf in files if rf.meta.get("device_type") != "cpu" and not rf.device.upper().startswith("CPU")]
    step = step_rows([rf for rf in files if rf.family == "step"])
    for r in step:
        if r.get("ms") and r["case"] == "fused" and r.get("vs_fm"):
            limit = 1.2 if r["guidance"] == "off" else 1.6
            _check(checks, f"fused step <= {limit}x flow matching, guidance {r['guidance']}, {r['mode']}/{r['mode']}",
                   _short(r["model"], r.get("batch")), r["vs_fm"], r["vs_fm"] <= limit, r["_file"], r["_label"])
    for e in like_for_like(step):
        part = _short(e["model"], e["batch"])
        for m in MODES:
            v = e.get(f"autograd/fused {m}")
            if v:
                _check(checks, f"fused >= 2x faster than autograd, {m}/{m}", part, v, v >= 2.0, e["file"], e["label"])
        v = e.get("best autograd/best fused")
        if v:
            gaps = e.get("autograd modes without a time")
            target = "fused >= 2x faster than autograd, best mode of each" + \
                (f" (autograd: no {'/'.join(gaps)} time)" if gaps else "")
            _check(checks, target, part, v, v >= 2.0, e["file"], e["label"])
    for r in step:
        if r["case"] != "fused":
            continue
        for key, what in (("mem_vs_fm", "step growth"), ("total_vs_fm", "total peak")):
            if r.get(key):
                _check(checks, f"fused step memory <= 1.25x flow matching ({what}, {r['mode']}/{r['mode']})",
                       _short(r["model"], r.get("batch")), r[key], r[key] <= 1.25, r["_file"], r["_label"])
    for rf in files:
        if rf.family != "attention":
            continue
        by = {(r["dtype"], r["D"], r["N"], r["provider"]): r for r in rf.rows if not r.get("causal") and r.get("ms")}
        for (dtype, d, n, p), r in sorted(by.items()):
            if p != "fused_fwd_jvp":
                continue
            part = f"{dtype} D{d}"
            for other, target, fn in (
                    ("sdpa_flash_fwd", "attention fwd+JVP <= 2.0x SDPA flash (FA2) fwd", lambda a, b: (a / b, a / b <= 2.0)),
                    ("math_jvp", "attention fwd+JVP >= 10x faster than math JVP", lambda a, b: (b / a, b / a >= 10)),
                    ("sdpa_flash_bwd", "attention bwd <= 1.2x SDPA flash (FA2) bwd", None)):
                o = by.get((dtype, d, n, other))
                if not o:
                    continue
                if fn is None:
                    fb = by.get((dtype, d, n, "fused_bwd"))
                    if not fb:
                        continue
                    v, ok = fb["ms"] / o["ms"], fb["ms"] / o["ms"] <= 1.2
                else:
                    v, ok = fn(r["ms"], o["ms"])
                _check(checks, target, part, v, ok, _name(rf), rf.label)
            for check in ATTN_HOPPER_CHECKS:
                got = check(dtype, d, n, r, by)
                if got:
                    target, v, ok, unit = got
                    _check(checks, target, part, v, ok, _name(rf), rf.label, unit=unit)
    for rf in files:
        if rf.family != "target":
            continue
        for r in rf.rows:
            if r.get("provider") != "native" or r.get("mode") != "fwd":
                continue
            part = r["dtype"]
            if r.get("frac_of_copy") is not None:
                _check(checks, "target op forward >= 70% of copy bandwidth, call by call", part,
                       100 * r["frac_of_copy"], r["frac_of_copy"] >= 0.7, _name(rf), rf.label, unit="%")
            if r.get("device_frac_of_copy") is not None:
                _check(checks, "target op forward >= 70% of copy bandwidth, on the device", part,
                       100 * r["device_frac_of_copy"], r["device_frac_of_copy"] >= 0.7, _name(rf), rf.label,
                       unit="%")
    return list(checks.values())


def targets_table(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        met = c.met
        n, m = sum(met), len(met)
        verdict = "met" if n == m else ("missed" if n == 0 else f"missed in {m - n} of {m}")
        digits = 0 if c.unit == "%" else 2
        measured = "; ".join(f"{part}: {span([v for v, _ in values], digits, c.unit)}"
                             for part, values in c.parts.items())
        lines.append([c.target, measured, f"**{verdict}**" if n < m else verdict, f"`{c.file}`", c.label])
    return table(["target", "measured (per model or head dim; a range spans its rows)", "verdict", "file", "commit"],
                 lines)


# ------------------------------------------------------------------------------------------------ plots
def plot_attention(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for ax, d in zip(axes[0], dims):
        for provider in providers:
            pts = sorted((r["N"], r["ms"]) for r in rows if r["D"] == d and r["provider"] == provider and r.get("ms")
                         and not r.get("causal"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms", title=f"attention, D = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["_label"], r["model"], r.get("batch")) for r in rows if r.get("ms")))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 0.5 * len(rows) / len(panels) + 3) * len(panels), 4.5),
                             squeeze=False)
    colors = {"flow matching": "gray", "autograd": "tab:red", "explicit": "tab:blue", "fused": "tab:green"}
    for ax, (label, model, batch) in zip(axes[0], panels):
        sel = [r for r in rows if r["_label"] == label and r["model"] == model and r.get("batch") == batch
               and r.get("ms")]
        names = [f"{r['case'].split(' (')[0]}\ncfg {r['guidance']}\n{r['mode']}" for r in sel]
        ax.bar(range(len(sel)), [r["ms"] for r in sel],
               color=[colors.get(r["case"], "tab:purple") for r in sel],
               hatch=None, edgecolor=["black" if r["mode"] != "eager" else "none" for r in sel])
        ax.errorbar(range(len(sel)), [r["ms"] for r in sel],
                    yerr=[[r["ms"] - r.get("ms_p20", r["ms"]) for r in sel],
                          [r.get("ms_p80", r["ms"]) - r["ms"] for r in sel]], fmt="none", ecolor="black", lw=0.8)
        ax.set_xticks(range(len(sel)), names, fontsize=6)
        ax.set(ylabel="ms per training step (median, p20-p80)", title=f"{model}, batch {batch} ({label})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ assembling
def _family(files: list[ResultFile], family: str) -> list[ResultFile]:
    return [rf for rf in files if rf.family == family]


def build_report(folder: Path) -> str:
    files = load_folder(folder)
    devices = sorted({rf.device for rf in files}) or ["no result files"]
    parts = [f"# Benchmark results: {' / '.join(devices)}\n",
             f"Generated by `python bench/report.py {folder}` from the JSON files in this folder. Rows measured at "
             "different commits are never in one table: each table names its commit and files.\n",
             "## Provenance\n\n" + provenance_section(files) + "\n"]
    unknown = [rf.path.name for rf in files if not rf.known]
    if unknown:
        parts.append("Files without metadata of their own (commit taken from NOTES.md where it names one): " +
                     ", ".join(f"`{n}`" for n in unknown) + ".\n")
    checks = targets(files)
    if checks:
        parts.append("## Targets met / missed\n\n" + targets_table(checks) + "\n")
    step = _family(files, "step")
    if step:
        parts.append("## Training step (forward + loss + backward + AdamW)\n\n" + step_section(step) + "\n")
        lfl = like_for_like_table(like_for_like(step_rows(step)))
        if lfl:
            parts.append("### Like-for-like ratios\n\n'autograd/fused eager' = eager autograd ms / "
                         "eager fused ms (the same for other modes); 'best' = each backend's fastest mode; 'graphs' / "
                         "'kernels' split fused's gain over eager explicit into CUDA graphs (eager explicit / graphed "
                         "explicit) and the fused kernels (graphed explicit / graphed fused).\n\n" + lfl + "\n")
    if _family(files, "attention"):
        parts.append("## Attention: fused forward + JVP and backward (non-causal)\n\n" +
                     attention_sections(_family(files, "attention")) + "\n")
    for family, title, fn in (("block", "One DiT block, forward (+ JVP) + backward", block_section),
                              ("block_ops", "Block ops: fused vs eager vs autograd JVP", block_ops_section)):
        for _, group in by_label(_family(files, family)).items():
            rows = [r for rf in group for r in rf.rows if r.get("ms") is not None]
            if rows:
                parts.append(f"## {title}\n\n{group_heading(group)}\n\n{fn(rows)}\n")
    if _family(files, "target"):
        parts.append("## MeanFlow target/loss op: native vs eager chain\n\n" + target_sections(_family(files, "target")))
    for family in ("host", "overhead", "forward"):  # benchmarks without a section of their own: their rows as they are
        for _, group in by_label(_family(files, family)).items():
            rows = [r for rf in group for r in rf.rows]
            if rows:
                parts.append(f"## `{family}` rows\n\n{group_heading(group)}\n\n{generic_section(rows)}\n")
    att = [r for rf in _family(files, "attention") for r in rf.rows]
    if att:
        plot_attention(att, folder / "attention.png")
        parts.append("![attention](attention.png)\n")
    srows = step_rows(step)
    if any(r.get("ms") for r in srows):
        plot_step(srows, folder / "step.png")
        parts.append("![step](step.png)\n")
    return "\n".join(parts)


def _link(target: Path, page: Path | None) -> str:
    """A markdown link to `target` as written in `page`: relative to the page's folder (as given without a page)."""
    if page is None:
        return str(target)
    return Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)).as_posix()


def _card(file: str) -> str:
    """The card of a result file named '<card>-<date>/<file>' (its folder's first word, upper case: 'H100')."""
    return file.split("/")[0].split("-")[0].upper()


def summary_table(checks: list[Check]) -> str:
    """The README's one table: each target once, its values over every card, model and file, and how many rows met
    it. The per-file lines (with commits) are in docs/performance.md."""
    grouped: "OrderedDict[str, list[Check]]" = OrderedDict()
    for c in checks:
        grouped.setdefault(c.target, []).append(c)
    lines = []
    for target, group in grouped.items():
        met = [ok for c in group for ok in c.met]
        n, m = sum(met), len(met)
        rows = f"{m} row" + ("" if m == 1 else "s")
        verdict = (f"met ({rows})" if n == m else f"**missed** ({rows})" if n == 0
                   else f"**missed in {m - n} of {rows}**")
        unit = group[0].unit
        values = [v for c in group for v in c.values]
        cards = ", ".join(sorted({_card(c.file) for c in group}))
        lines.append([target, span(values, 0 if unit == "%" else 2, unit), verdict, cards])
    return table(["target", "measured (every model, card and run)", "verdict", "cards"], lines)


def readme_summary(folders: list[Path], performance: Path | None = None, readme: Path | None = None) -> str:
    """The README's performance block: the summary table over every folder and a link to the full section."""
    files = [rf for folder in folders for rf in load_folder(folder)]
    checks = targets([rf for rf in files if rf.family in ("step", "attention", "target")])
    page = _link(performance, readme) if performance is not None else "docs/performance.md"
    regen = "python bench/report.py " + " ".join(map(str, folders)) + " --readme README.md"
    out = [f"Generated by `{regen}` from the committed result files; every line's files, commits and per-model values "
           f"are in [{page}]({page}).\n"]
    if checks:
        out.append(summary_table(checks) + "\n")
    return "\n".join(out)


def readme_section(folders: list[Path], page: Path | None = None) -> str:
    """The full version (docs/performance.md): targets met / missed over every folder, then per card the step,
    attention and target-op tables (each benchmark from the first folder that has it), every table under its commit.
    `page`: the file the section goes into (links are made relative to it)."""
    regen = "python bench/report.py " + " ".join(map(str, folders)) + " --readme README.md"
    loaded = [(folder, load_folder(folder)) for folder in folders]
    out = [f"Generated from the committed result files named with every table (`{regen}`). Rows measured at "
           "different commits are never mixed in one table; files without metadata of their own show "
           "\"commit unknown / NOTES: <commit>\", the commit their folder's NOTES.md names.\n"]
    all_files = [rf for _, files in loaded for rf in files]
    checks = targets([rf for rf in all_files if rf.family in ("step", "attention", "target")])
    if checks:
        out.append("**Targets met / missed** (every row names its result file and commit; 'eager/eager' = the mode "
                   "of each side of the ratio; a range spans guidance off / on, or sequence lengths):\n\n"
                   + targets_table(checks) + "\n")
    shown: set[str] = set()
    for folder, files in loaded:
        part = []
        step = _family(files, "step")
        if step and "step" not in shown:
            part.append("**Training step** (forward + loss + backward + AdamW), MeanFlow vs flow matching of the same "
                        "model; '/ FM' divides by the flow-matching step of the same mode; ms = median (p20-p80). "
                        "Memory per row in the folder's REPORT.md.\n\n" + step_section(step, folder, memory=False))
            lfl = like_for_like_table(like_for_like(step_rows(step)))
            if lfl:
                part.append("Like-for-like ratios (the other backend's ms / this backend's ms, same mode; 'best' = "
                            "each backend's fastest measured mode):\n\n" + lfl + "\n")
            shown.add("step")
        att = _family(files, "attention")
        if att and "attention" not in shown:
            part.append("**Attention** forward + JVP (bf16, non-causal, 16k tokens per batch); SDPA's default "
                        "backend was not forced, and which one it picked was not recorded (cuDNN is torch 2.11's "
                        "default on sm90; docs/design.md, 'Performance model'):\n\n"
                        + attention_sections(att, folder, readme=True))
            shown.add("attention")
        tgt = _family(files, "target")
        if tgt and "target" not in shown:
            part.append("**MeanFlow target/loss op** (`torch.ops.mfkernels.meanflow_loss`) against the eager chain. "
                        + target_sections(tgt, folder))
            shown.add("target")
        if part:
            devices = " / ".join(sorted({rf.device for rf in files}))
            out.append(f"### {devices}\n\nFolder [`{folder}`]({_link(Path(folder) / 'REPORT.md', page)}).\n")
            out += part
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="result folders, one per card (the first wins in the README)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="rewrite this README's summary table and the full performance section of --performance")
    ap.add_argument("--performance", type=Path, default=None,
                    help="the page of the full performance section (default: docs/performance.md next to --readme)")
    args = ap.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder of result files")
        (folder / "REPORT.md").write_text(build_report(folder))
        print(f"wrote {folder / 'REPORT.md'}")
    performance = args.performance
    if performance is None and args.readme is not None:
        performance = args.readme.parent / "docs" / "performance.md"
    if performance is not None:
        _replace_block(performance, "perf", readme_section(args.folders, performance))
        print(f"updated the performance section of {performance}")
    if args.readme is not None:
        _replace_block(args.readme, "perf-summary", readme_summary(args.folders, performance, args.readme))
        print(f"updated the performance summary of {args.readme}")


def _replace_block(path: Path, name: str, body: str) -> None:
    """Rewrite what lies between `<!-- NAME:start -->` and `<!-- NAME:end -->` in `path` (both must be there)."""
    text = path.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text,
                           flags=re.S))


if __name__ == "__main__":
    main()
