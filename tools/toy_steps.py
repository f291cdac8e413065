"""Why 2-step sampling can score worse than 1-step on the toy preset: train it, then measure each jump against the
EXACT flow of the checkerboard.

The checkerboard is uniform on 8 unit squares, so the flow-matching velocity has a closed form: given z_t = (1 - t) x
+ t e, x's posterior is the data density times a Gaussian, a truncated normal per coordinate on each square, and
v(z, t) = (z - E[x | z_t = z]) / t. Integrating dz/dt = v (RK4, 500 steps: 2000 give the same end points to 1e-13) gives where each noise point
should land at any time; the model's average-velocity jumps are compared with that:

- `1step`: x = e - u(e, r=0, t=1), error against the ODE end point;
- `2step`: through the midpoint m; its first jump (e -> z_m) and its second jump measured two ways: from the model's
  own z_m (what the sampler does) and from the exact z_m (the model's accuracy on [0, m] alone);
- sliced Wasserstein (SW_2) of every schedule's samples to held-out data, as `meanflow eval` reports.

    python tools/toy_steps.py --seeds 0 1 2 --out docs/toy_steps/preset.json   # ~1-2 min per seed on 2 CPU cores
    python tools/toy_steps.py --seeds 0 --train-steps 12000 --out docs/toy_steps/preset_12000_steps.json
    python tools/toy_steps.py --seeds 0 --set loss.ratio=0.25 --set loss.p=1.0 --out docs/toy_steps/ratio0.25_p1.json
    python tools/toy_steps.py --seeds 0 --set loss.time_sampler=uniform --out docs/toy_steps/uniform_times.json

Writes one JSON (per seed and their mean) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meanflow.data.datasets import build_dataset  # noqa: E402
from meanflow.evaluation.metrics import sliced_wasserstein  # noqa: E402
from meanflow.evaluation.sampling import sample  # noqa: E402
from meanflow.training.config import apply_overrides  # noqa: E402
from meanflow.training.presets import get_preset  # noqa: E402
from meanflow.training.trainer import Trainer  # noqa: E402

# the 8 black unit squares of meanflow.data.datasets._checkerboard: (x1 low, x2 low)
SQUARES = [(c, lo) for c in (-2, -1, 0, 1) for lo in ((0, -2) if c % 2 == 0 else (1, -1))]
F64 = torch.float64


def _log_mass(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha < beta, accurate in both tails."""
    flip = alpha > 0  # upper tail: use the mirror image, where log_ndtr is accurate
    a, b = torch.where(flip, -beta, alpha), torch.where(flip, -alpha, beta)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log1p(-torch.exp((la - lb).clamp(max=-1e-300)))


def exact_velocity(z: torch.Tensor, t: float) -> torch.Tensor:
    """v(z, t) = (z - E[x | z_t = z]) / t for the checkerboard (float64)."""
    mu, sigma = z / (1 - t), t / (1 - t)  # x | z ~ N(z / (1 - t), sigma^2) times the data density
    logw, means = [], []
    for c, lo in SQUARES:
        m, lw = torch.empty_like(z), torch.zeros(z.shape[0], dtype=F64)
        for d, a in enumerate((float(c), float(lo))):
            alpha, beta = (a - mu[:, d]) / sigma, (a + 1 - mu[:, d]) / sigma
            log_z = _log_mass(alpha, beta)
            # truncated-normal mean: mu + sigma (phi(alpha) - phi(beta)) / (Phi(beta) - Phi(alpha))
            log_phi_a, log_phi_b = -alpha ** 2 / 2 - 0.5 * math.log(2 * math.pi), -beta ** 2 / 2 - 0.5 * math.log(
                2 * math.pi)
            ratio = torch.exp(log_phi_a - log_z) - torch.exp(log_phi_b - log_z)
            m[:, d] = (mu[:, d] + sigma * ratio).clamp(a, a + 1)
            lw = lw + log_z
        logw.append(lw)
        means.append(m)
    w = torch.softmax(torch.stack(logw), 0)  # (8, n)
    ex = (w[..., None] * torch.stack(means)).sum(0)
    return (z - ex) / t


def exact_flow(e: torch.Tensor, stops: list[float], n: int = 500) -> dict[float, torch.Tensor]:
    """z_t of the exact ODE from z_1 = e (RK4 on a grid uniform in log t near 0), at each t in `stops`."""
    t_grid = torch.cat([torch.linspace(1 - 1e-6, 0.05, n // 2, dtype=F64),
                        torch.logspace(math.log10(0.05), -6, n // 2 + 1, dtype=F64)[1:]])
    grid = sorted(set(t_grid.tolist()) | {s for s in stops if s > 0}, reverse=True)
    out, z = {}, e.double().clone()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        k1 = exact_velocity(z, t0)
        k2 = exact_velocity(z + h / 2 * k1, t0 + h / 2)
        k3 = exact_velocity(z + h / 2 * k2, t0 + h / 2)
        k4 = exact_velocity(z + h * k3, t1)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if t1 in stops:
            out[t1] = z.clone()
    # last stretch to t = 0: E[x | z_t] at tiny t is the end point
    t = grid[-1]
    out[0.0] = z - t * exact_velocity(z, t)
    return out


@torch.no_grad()
def jump(model, z: torch.Tensor, t: float, r: float) -> torch.Tensor:
    ones = torch.ones(z.shape[0])
    return z - (t - r) * model(z.float(), t * ones, (t - r) * ones, None).double()


def msd(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum(1).mean())


def measure(model, *, n_ode: int, n_sw: int, midpoints: list[float], seed: int = 1234) -> dict:
    data = build_dataset("checkerboard").sample(n_sw, torch.Generator().manual_seed(seed + 1))[0]
    other = build_dataset("checkerboard").sample(n_sw, torch.Generator().manual_seed(seed + 2))[0]
    noise = torch.randn(n_sw, 2, generator=torch.Generator().manual_seed(seed))

    def sw(x):
        return sliced_wasserstein(x, data, num_projections=1024, seed=seed)

    out = {"sw_data_vs_data": sw(other), "sw": {"1step": sw(sample(model, noise, steps=1))}}
    for m in midpoints:
        out["sw"][f"2step@{m}"] = sw(sample(model, noise, steps=2, midpoint=m))
    for k in (4, 8):
        out["sw"][f"{k}step"] = sw(sample(model, noise, steps=k))

    e = noise[:n_ode].double()
    flow = exact_flow(e, midpoints)
    x_true = flow[0.0]
    out["exact_ode_sw"] = sw(x_true.float())  # how close the ODE integration itself lands (a check)
    out["mean_sq_error_vs_exact_ode"] = err = {"1step": msd(jump(model, e, 1.0, 0.0), x_true)}
    for m in midpoints:
        z_m = jump(model, e, 1.0, m)
        err[f"2step@{m}"] = {
            "first_jump_vs_exact_z_m": msd(z_m, flow[m]),
            "second_jump_from_exact_z_m": msd(jump(model, flow[m], m, 0.0), x_true),
            "two_steps": msd(jump(model, z_m, m, 0.0), x_true),
        }
    return out


def train(seed: int, steps: int | None, workdir: Path, extra: list[str]):
    overrides = ["train.progress=false", "eval.enabled=false", "train.sample_every=0", f"train.seed={seed}",
                 "train.threads=1", *extra]
    if steps:
        overrides.append(f"train.steps={steps}")
    cfg = apply_overrides(get_preset("toy"), overrides)
    trainer = Trainer(cfg, workdir / f"seed{seed}")
    t0 = time.perf_counter()
    trainer.train()
    return trainer.ema.default.eval(), time.perf_counter() - t0, cfg.train.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-steps", type=int, default=None, help="default: the preset's (3000)")
    ap.add_argument("--midpoints", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--n-ode", type=int, default=2000, help="noise points integrated with the exact ODE")
    ap.add_argument("--n-sw", type=int, default=5000, help="samples per SW_2 (the preset's eval.num_samples)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config changes, as for meanflow")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            model, wall, steps = train(seed, args.train_steps, Path(tmp), args.set)
            runs[str(seed)] = {"train_steps": steps, "train_wall_s": round(wall, 1),
                               **measure(model, n_ode=args.n_ode, n_sw=args.n_sw, midpoints=args.midpoints)}
            r = runs[str(seed)]
            print(f"seed {seed}: {steps} steps in {wall:.0f} s; SW " +
                  ", ".join(f"{k} {v:.4f}" for k, v in r["sw"].items()) + f" (data vs data {r['sw_data_vs_data']:.4f})",
                  flush=True)
            for k, v in r["mean_sq_error_vs_exact_ode"].items():
                print(f"    error vs exact ODE {k}: {json.dumps(v) if isinstance(v, dict) else round(v, 4)}",
                      flush=True)
    keys = list(next(iter(runs.values()))["sw"])
    summary = {k: sum(r["sw"][k] for r in runs.values()) / len(runs) for k in keys}
    result = {"command": "python tools/toy_steps.py " + " ".join(sys.argv[1:]), "preset": "toy", "set": args.set,
              "what": __doc__.split("\n\n")[1].replace("\n", " "), "mean_sw_over_seeds": summary, "runs": runs}
    print("mean SW over seeds: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
