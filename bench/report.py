"""Turn a folder of benchmark result files into REPORT.md and plots, and (optionally) the README's performance section.

    python bench/report.py bench/results/h200-2026-11-26                     # -> REPORT.md, attention.png, step.png
    python bench/report.py bench/results/h200-2026-11-26 --readme README.md  # also rewrites the README section
    python bench/report.py bench/results/h100-a bench/results/h200-b --readme README.md  # several cards: each
        # benchmark is shown from the first folder that has it, under that folder's card

Every number in the README's performance section comes from here, i.e. from committed JSON files, with the card named.
The README section sits between the markers `<!-- perf:start -->` and `<!-- perf:end -->`.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load_rows(folder: Path, stem: str) -> tuple[list[dict], dict]:
    """All rows of `<stem>.json` and `<stem>_run*.json` in folder (several runs of one benchmark are concatenated)."""
    rows, meta = [], {}
    for path in sorted(p for p in folder.glob("*.json") if re.fullmatch(rf"{stem}(_run.*)?\.json", p.name)):
        data = json.loads(path.read_text())
        rows += [r for r in data.get("rows", []) if r.get("ms") is not None or r.get("error")]
        meta = data.get("meta") or {k: v for k, v in data.items() if k not in ("rows", "summary")}
    return rows, meta


def device_of(folder: Path) -> str:
    env = folder / "env.json"
    if env.exists():
        info = json.loads(env.read_text())
        return f"{info.get('device', 'CPU')} (torch {info['torch']}, triton {info['triton']})"
    for stem in ("step", "attention", "block"):
        _, meta = load_rows(folder, stem)
        if meta:
            return f"{meta.get('device')} (torch {meta.get('torch')}, triton {meta.get('triton')})"
    return "unknown device"


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- sections
def attention_section(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        if not r.get("causal"):
            by[(r["dtype"], r["D"], r["N"], r["provider"])] = r
    keys = sorted({(d, D, N) for d, D, N, _ in by})
    lines = []
    for dtype, d, n in keys:
        get = lambda p: by.get((dtype, d, n, p), {})  # noqa: E731
        fused, flash, cudnn, math = get("fused_fwd_jvp"), get("sdpa_flash_fwd"), get("sdpa_default_fwd"), get("math_jvp")
        fb, flb = get("fused_bwd"), get("sdpa_flash_bwd")
        if not fused.get("ms"):
            continue
        lines.append([f"{dtype} D{d} N{n} (B{fused['B']} H{fused['H']})", fmt(fused["ms"], 3), fmt(fused["tflops"], 0),
                      fmt(flash.get("ms"), 3), fmt(cudnn.get("ms"), 3),
                      fmt(fused["ms"] / flash["ms"]) + "x" if flash.get("ms") else "-",
                      fmt(math["ms"] / fused["ms"], 1) + "x" if math.get("ms") else math.get("error", "-"),
                      fmt(fb["ms"] / flb["ms"]) + "x" if fb.get("ms") and flb.get("ms") else "-",
                      f"{fmt(fused.get('peak_mem_mb'), 0)} / {fmt(math.get('peak_mem_mb'), 0)}"])
    return table(["shape", "fused fwd+JVP ms", "eff. TFLOP/s", "SDPA flash fwd ms", "SDPA cuDNN fwd ms",
                  "fused / flash fwd", "math JVP / fused", "fused bwd / flash bwd", "peak MB fused / math"], lines)


def short_error(error: str) -> str:
    return "out of memory" if "out of memory" in error.lower() else error


def step_section(rows: list[dict]) -> str:
    lines = []
    mixed_batch = len({r.get("batch") for r in rows}) > 1
    for r in rows:
        model = f"{r['model']}, batch {r.get('batch')}" if mixed_batch else r["model"]
        if "ms" not in r:
            lines.append([model, r["objective"].replace("_", " "),
                          r["backend"] + (" + CUDA graph" if r.get("cuda_graph") else ""),
                          r["guidance"], short_error(r.get("error", "no time")), "-", "-", "-", "-", "-"])
            continue
        mem_ok = not r.get("cuda_graph") or r.get("peak_mem_method")  # early graph rows missed the pool's memory
        backend = "-" if r["objective"] == "flow_matching" else r["backend"]
        if r.get("cuda_graph"):
            backend = "CUDA graph" if backend == "-" else backend + " + CUDA graph"
        lines.append([model, r["objective"].replace("_", " "), backend, r["guidance"], fmt(r["ms"], 1),
                      fmt(r["samples_per_s"], 0), fmt(r.get("ratio_to_fm")) + "x",
                      fmt(r.get("ratio_to_fm_graph")) + "x" if r.get("ratio_to_fm_graph") else "-",
                      fmt(r.get("peak_mem_mb"), 0) if mem_ok else "not measured",
                      fmt(r.get("mem_ratio_to_fm")) + "x" if r.get("mem_ratio_to_fm") and mem_ok else "-"])
    batch = "per row" if mixed_batch else (rows[0].get("batch") if rows else "?")
    return (f"Batch {batch}, ratio {rows[0].get('ratio', 0.25) if len(rows) < 2 else rows[1].get('ratio')}"
            f" (rows with r != t), dtype {rows[0].get('dtype') if rows else '?'}; guidance on = kappa 0.5, omega 1.0.\n\n"
            + "'vs flow matching' divides by the eager flow-matching step; 'vs FM + graph' by the flow-matching step "
              "run through the same CUDA-graph wrapper.\n\n"
            + table(["model", "objective", "backend", "guidance", "ms / step", "samples/s", "vs flow matching",
                     "vs FM + graph", "peak MB", "memory vs FM"], lines))


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


def target_section(rows: list[dict]) -> str:
    by = {(tuple(r["shape"]), r["dtype"], r["mode"], r["provider"]): r for r in rows}
    lines = []
    for (shape, dtype, mode, provider), r in by.items():
        if provider != "native":
            continue
        torch_row, copy = by.get((shape, dtype, mode, "torch"), {}), by.get((shape, dtype, mode, "copy"), {})
        dev = r.get("device_ms")
        lines.append(["x".join(map(str, shape)), dtype, mode, fmt(r["ms"], 4), fmt(torch_row.get("ms"), 4),
                      fmt(torch_row["ms"] / r["ms"]) + "x" if torch_row.get("ms") else "-", fmt(r.get("gbps"), 0),
                      f"{100 * r['gbps'] / copy['gbps']:.0f}%" if copy.get("gbps") and r.get("gbps") else "-",
                      fmt(dev * 1e3, 1) if dev else "-",
                      fmt(torch_row["device_ms"] / dev) + "x" if dev and torch_row.get("device_ms") else "-",
                      fmt(r.get("device_gbps"), 0),
                      f"{100 * r['device_frac_of_copy']:.0f}%" if r.get("device_frac_of_copy") else "-"])
    return ("Call by call (do_bench: host launch cost included) and on the device alone (replayed from a CUDA graph "
            "over input copies larger than L2: HBM-bound, no host cost).\n\n"
            + table(["shape", "dtype", "pass", "native ms", "eager ms", "speedup", "native GB/s", "of D2D copy",
                     "device us", "device speedup", "device GB/s", "device: of copy"], lines))


# -------------------------------------------------------------------------------------------------------- plots
def plot_attention(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for provider in ("fused_fwd_jvp", "math_jvp", "sdpa_flash_fwd", "sdpa_default_fwd", "fused_bwd",
                         "sdpa_flash_bwd"):
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

    panels = list(dict.fromkeys((r["model"], r.get("batch")) for r in rows))  # one panel per model and batch
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        sel = [r for r in rows if r["model"] == model and r.get("batch") == batch and r.get("ms")]
        labels = [("FM" if r["objective"] == "flow_matching" else f"{r['backend']}\ncfg {r['guidance']}")
                  + ("\n+graph" if r.get("cuda_graph") else "") for r in sel]
        colors = ["gray" if r["objective"] == "flow_matching" else
                  {"autograd": "tab:red", "explicit": "tab:blue", "fused": "tab:green"}[r["backend"]] for r in sel]
        colors = ["black" if r.get("cuda_graph") and r["objective"] != "flow_matching" else c
                  for r, c in zip(sel, colors)]
        ax.bar(range(len(sel)), [r["ms"] for r in sel], color=colors)
        ax.set_xticks(range(len(sel)), labels, fontsize=7)
        ax.set(ylabel="ms per training step", title=f"{model}, batch {batch}: MeanFlow step per backend")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- main
def build_report(folder: Path) -> str:
    parts = [f"# Benchmark results: {device_of(folder)}\n", f"Generated by `python bench/report.py {folder}` from the "
             "JSON files in this folder.\n"]
    sections = [("attention", "Attention: fused forward + JVP and backward (non-causal)", attention_section),
                ("step", "Training step (forward + loss + backward + AdamW)", step_section),
                ("block", "One DiT block, forward (+ JVP) + backward", block_section),
                ("block_ops", "Block ops: fused vs eager vs autograd JVP", block_ops_section),
                ("target", "MeanFlow target/loss op: native vs eager chain", target_section)]
    for stem, title, fn in sections:
        rows, _ = load_rows(folder, stem)
        if rows:
            parts.append(f"## {title}\n\n{fn(rows)}\n")
    att, _ = load_rows(folder, "attention")
    if att:
        plot_attention(att, folder / "attention.png")
        parts.append("![attention](attention.png)\n")
    step, _ = load_rows(folder, "step")
    if step:
        plot_step(step, folder / "step.png")
        parts.append("![step](step.png)\n")
    return "\n".join(parts)


def readme_section(folders: list[Path]) -> str:
    """The short README version: headline step, attention and target-op numbers. With several folders (one per card),
    each benchmark comes from the first folder that has it, under that folder's card."""
    shown: set[str] = set()
    regen = "python bench/report.py " + " ".join(map(str, folders)) + " --readme README.md"
    out = [f"Every row comes from the committed result files named with it (regenerate with `{regen}`).\n"]
    for folder in folders:
        part = []
        step, _ = load_rows(folder, "step")
        if step and "step" not in shown:
            part.append("**Training step** (forward + loss + backward + AdamW), MeanFlow vs flow matching of the same "
                        "model. " + step_section(step) + "\n")
            shown.add("step")
        att, _ = load_rows(folder, "attention")
        if att and "attention" not in shown:
            part.append("**Attention** forward + JVP (bf16, non-causal, 16k tokens per batch):\n")
            part.append(attention_section([r for r in att if r["dtype"] == "bf16"]) + "\n")
            shown.add("attention")
        tgt, _ = load_rows(folder, "target")
        if tgt and "target" not in shown:
            part.append("**MeanFlow target/loss op** (`torch.ops.mfkernels.meanflow_loss`) against the eager chain and "
                        "a device-to-device copy of the same bytes. " + target_section(tgt) + "\n")
            shown.add("target")
        if part:
            out.append(f"### {device_of(folder).split(' (')[0]}\n\nMeasured on **{device_of(folder)}**; rows from "
                       f"[`{folder}`]({folder}/REPORT.md).\n")
            out += part
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="result folders, one per card (the first wins in the README)")
    ap.add_argument("--readme", type=Path, default=None, help="rewrite this README's performance section")
    args = ap.parse_args(argv)
    for folder in args.folders:
        (folder / "REPORT.md").write_text(build_report(folder))
        print(f"wrote {folder / 'REPORT.md'}")
    if args.readme:
        text = args.readme.read_text()
        start, end = "<!-- perf:start -->", "<!-- perf:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{args.readme} has no {start} ... {end} markers")
        new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{readme_section(args.folders)}\n{end}",
                     text, flags=re.S)
        args.readme.write_text(new)
        print(f"updated the performance section of {args.readme}")


if __name__ == "__main__":
    main()
