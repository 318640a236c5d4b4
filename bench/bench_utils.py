"""Shared pieces of the benchmarks: timing (alternating A/B, medians), tables, JSON, machine info,
and the benchmark network configurations built in both stacks (jaxdiff UNet, diffusers UNet2DModel).

Not a test module: ``bench/`` is never collected by pytest. Every script imports this file from
its own directory (``python bench/NAME.py`` puts ``bench/`` on ``sys.path``).
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
from typing import Callable

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


def machine_info() -> dict:
    import jax

    info = {
        "date_run": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
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
    for name, fn in cases.items():
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


# --------------------------------------------------------------------------- networks
@dataclasses.dataclass(frozen=True)
class NetConfig:
    """One benchmark network: the jaxdiff UNet fields plus the data it trains on."""

    name: str
    image_shape: tuple[int, int, int]  # (H, W, C)
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    batch: int
    num_classes: int | None = None
    dropout: float = 0.0


CONFIGS = {
    # CPU-sized 32x32 RGB network: the DDPM CIFAR-10 architecture at a quarter of its width
    # (ch 32), 3 levels, 1 ResBlock per level, attention at 16x16.
    "cifar_small": NetConfig("cifar_small", (32, 32, 3), 32, (1, 2, 2), 1, (16,), batch=16),
    # The repository's default (configs/digits.py): class-conditional, 8x8x1, batch 128.
    "digits": NetConfig("digits", (8, 8, 1), 64, (1, 2), 1, (4,), batch=128, num_classes=10),
    # Ho et al. (2020) CIFAR-10 model (35.7M parameters), batch 128: for accelerators.
    "ddpm_cifar10": NetConfig("ddpm_cifar10", (32, 32, 3), 128, (1, 2, 2, 2), 2, (16,), batch=128, dropout=0.1),
}


def jax_unet(cfg: NetConfig, dtype: str = "float32", remat: bool = False):
    import jax.numpy as jnp

    from jaxdiff.models import UNet

    return UNet(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout, num_classes=cfg.num_classes,
                dtype=jnp.dtype(dtype), remat=remat)


def torch_unet(cfg: NetConfig):
    """The same architecture as diffusers' ``UNet2DModel``.

    Matched: block widths, one ResBlock stack per level (``layers_per_block``; the decoder has one
    more, as in both codebases), attention (one head, full width) after every ResBlock at the
    ``attn_resolutions`` and in the middle, GroupNorm(32, eps=1e-6), the DDPM sinusoidal time
    embedding (sin first, ``freq_shift=1``) through two Dense layers to ``4 ch``, a class
    embedding table of ``num_classes + 1`` rows (null label) when conditional, strided-conv
    downsampling and nearest-upsample + conv. The only difference: jaxdiff's stride-2 conv pads
    SAME (bottom/right), diffusers' pads 1 on each side (same shapes and FLOPs).
    """
    from diffusers import UNet2DModel

    h, _, c = cfg.image_shape
    down, up, res = [], [], h
    for _ in cfg.ch_mult:
        down.append("AttnDownBlock2D" if res in cfg.attn_resolutions else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if res in cfg.attn_resolutions else "UpBlock2D")
        res //= 2
    model = UNet2DModel(
        sample_size=h, in_channels=c, out_channels=c, time_embedding_type="positional",
        flip_sin_to_cos=False, freq_shift=1, down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, dropout=cfg.dropout,
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1,
    )
    # diffusers takes one group count for every norm; jaxdiff uses num_groups(channels) (32 for
    # wide layers, fewer for narrow ones). GroupNorm's parameters are per channel, so setting the
    # count per module gives the identical network.
    import torch

    from jaxdiff.models.layers import num_groups

    for mod in model.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.num_groups = num_groups(mod.num_channels)
    return model


def torch_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
