"""The benchmarks' harness: timing (alternating A/B, medians), cross-process A/B workers (for
XLA flags), tables, JSON, machine info, and the optional torch side (threads, availability).

Also the distances to the Gaussian-mixture oracle that the quality tables share. The networks
(and the one jaxdiff train step every benchmark times) live in ``bench/networks.py``.
Not a test module: ``bench/`` is never collected by pytest. Every script imports these files
from its own directory (``python bench/NAME.py`` puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BENCH_DATE = "2026-11-23"  # the date the figures in BENCHMARKS.md were taken


# --------------------------------------------------------------------------- CLI / output
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fast smoke run (fewer rounds, smaller sizes)")
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds (alternating); default per script")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/NAME.json)")
    return p


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return float("nan")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): machines that
    share a core count can differ twofold in how fast each stack runs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import jax

    info = {
        "date_run": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "loadavg_1min_start": load_average(),
    }
    for mod in ("jaxlib", "flax", "optax", "torch", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def write_json(name: str, payload: dict, out: str | None = None) -> str:
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    payload["machine"]["loadavg_1min_end"] = load_average()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    print(f"\nwrote {path}")
    return path


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats get 4 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
                return f"{v:.3g}"
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], None], iters: int) -> float:
    """Seconds per call of ``fn`` (which must block until its work is done) over ``iters`` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def alternate(cases: dict[str, Callable[[], None]], rounds: int, iters: int | dict[str, int] = 1,
              warmup: int = 1) -> dict[str, dict]:
    """Times each case ``rounds`` times, alternating A B A B ..., after ``warmup`` untimed calls.

    Returns ``{name: {"median_s", "min_s", "samples_s"}}`` (seconds per call). Medians resist the
    noise of a shared machine; alternation spreads slow periods over every case alike.
    """
    iters = iters if isinstance(iters, dict) else {k: iters for k in cases}
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(time_calls(fn, iters[name]))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v} for k, v in samples.items()}


def block(tree):
    """Blocks on every JAX array of ``tree`` and returns it."""
    import jax

    return jax.block_until_ready(tree)


# --------------------------------------------------------------------------- torch side (optional)
def quiet_torch():
    """Silences diffusers' import-time warnings and returns torch."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import torch

    return torch


def with_threads(fn: Callable, n: int) -> Callable:
    """``fn`` run with ``torch.set_num_threads(n)`` (restored afterwards)."""
    torch = quiet_torch()

    def run(*args):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(old)

    return run


def add_torch_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-threads", default=None,
                   help="comma list of PyTorch thread counts to time (default: torch's default and 1; on a "
                        "shared, oversubscribed machine 1 thread can be much faster)")


def torch_thread_counts(arg: str | None) -> tuple[int, ...]:
    if arg:
        return tuple(int(n) for n in arg.split(","))
    return tuple(sorted({quiet_torch().get_num_threads(), 1}, reverse=True))


def have_torch() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def eprint(*args):
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cross-process A/B
# XLA flags are read once per process, so comparing flag settings needs one process per
# setting. Each worker compiles its cases, then times one case per request; the parent sends
# the requests alternately (A B A B ...), so every setting sees the same machine load.
def worker_loop(cases: dict[str, Callable[[], None]]) -> None:
    """Child side: announce the cases, then time ``cases[name]`` once per line read from stdin."""
    for fn in cases.values():
        fn()  # warm-up
    print(json.dumps({"ready": list(cases)}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name or name == "quit":
            break
        print(json.dumps({"name": name, "s": time_calls(cases[name], 1)}), flush=True)


class Worker:
    """Parent side of :func:`worker_loop`: a child process with its own environment (XLA_FLAGS)."""

    def __init__(self, argv: list[str], env_updates: dict[str, str]):
        import subprocess

        env = dict(os.environ, **env_updates)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.cases = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with code {self.proc.wait()}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def time(self, name: str) -> float:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait()


def alternate_workers(workers: dict[str, Worker], rounds: int) -> dict[str, dict]:
    """``{f"{worker}/{case}": stats}`` timing every case of every worker, alternating."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for wname, w in workers.items():
            for case in w.cases:
                samples.setdefault(f"{wname}/{case}", []).append(w.time(case))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v} for k, v in samples.items()}


# --------------------------------------------------------------------------- oracle metrics
# Distances between samples and the Gaussian-mixture oracle (``jaxdiff.oracle``), shared by
# ``bench/oracle_table.py`` and ``bench/quality.py``: :func:`mmd2` (unbiased squared MMD against
# the *exact* mixture, whose kernel mean embedding is analytic: 0 in expectation for exact
# samples), :func:`sliced_w2`, and the budget rule both tables use, :func:`steps_for_budget`
# (the most steps of a sampler whose network calls, ``jaxdiff.samplers.nfe``, fit a budget).
def mmd2(x, mix, ell: float = 0.5, block: int = 1000) -> float:
    """Unbiased MMD^2 between samples ``x [n, D]`` and the mixture ``mix`` (Gaussian kernel of
    bandwidth ``ell``); the mixture terms exact, the sample term summed blockwise in float32."""
    import jax
    import jax.numpy as jnp

    n, dim = x.shape
    l2 = ell**2
    eye = jnp.eye(dim)

    def embed(diff, s):  # E k for a Gaussian difference of covariance s - ell^2 I
        quad = jnp.einsum("...i,ij,...j->...", diff, jnp.linalg.inv(s), diff)
        return ell**dim / jnp.sqrt(jnp.linalg.det(s)) * jnp.exp(-0.5 * quad)

    @jax.jit
    def pair_sum(xb, x):
        d2 = jnp.sum((xb[:, None, :] - x[None]) ** 2, -1)
        return jnp.sum(jnp.exp(-d2 / (2.0 * l2)))

    xx = sum(float(pair_sum(x[i:i + block], x)) for i in range(0, n, block)) - n  # drop the diagonal
    k = mix.weights.shape[0]
    xp = float(jnp.mean(sum(mix.weights[c] * embed(x - mix.means[c], l2 * eye + mix.covs[c]) for c in range(k))))
    pp = float(sum(mix.weights[a] * mix.weights[b]
                   * embed(mix.means[a] - mix.means[b], l2 * eye + mix.covs[a] + mix.covs[b])
                   for a in range(k) for b in range(k)))
    return xx / (n * (n - 1)) - 2.0 * xp + pp


def sliced_w2(x, y, dirs) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets ``x, y [n, D]`` over the
    directions ``dirs [L, D]`` (normalised here; e.g. Gaussian draws), in float64."""
    import numpy as np

    x, y, dirs = (np.asarray(v, np.float64) for v in (x, y, dirs))
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2: x and y must have the same shape, got {x.shape} and {y.shape}")
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def steps_for_budget(sampler: str, budget: int, options: dict | None = None) -> tuple[int, int] | None:
    """``(num_steps, nfe)``: the most steps of the fixed-step ``sampler`` (with ``options``) whose
    NFE is at most ``budget`` (e.g. ``heun``: ``(budget + 1) // 2`` steps); ``None`` if none fits."""
    from jaxdiff import samplers

    for n in range(budget, 0, -1):
        calls = int(samplers.nfe(sampler, n, **(options or {})))
        if calls <= budget:
            return n, calls
    return None


def budget_table(rows: list[dict], labels, budgets, fmt) -> list[list[str]]:
    """Table rows (exact samples first, then one per label) of ``fmt(row)`` per NFE budget.

    ``rows[0]`` is the exact samples' row; a cell notes the actual NFE where it differs from the budget.
    """
    table = [["exact samples"] + [fmt(rows[0])] * len(budgets)]
    for label in labels:
        cells = [label]
        for budget in budgets:
            r = next(r for r in rows if r["sampler"] == label and r["budget"] == budget)
            cells.append(fmt(r) + (f" ({r['nfe']})" if r["nfe"] != budget else ""))
        table.append(cells)
    return table
