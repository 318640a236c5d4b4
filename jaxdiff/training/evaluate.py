"""Likelihoods of a trained workdir: the variational bound and the PF-ODE NLL, in bits/dim.

``scripts/eval.py`` writes the result to ``WORKDIR/eval.json``. It checks that it can before
evaluating (:func:`check_eval_output`), and a previous ``eval.json`` is never overwritten: it is
renamed to ``eval.YYYYmmdd-HHMMSS.json`` (its modification time) by :func:`write_eval`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import data, likelihood, objectives
from jaxdiff.training.workdir import load_workdir

__all__ = ["evaluate_workdir", "check_eval_output", "write_eval", "EVAL_FILE"]

EVAL_FILE = "eval.json"


def check_eval_output(workdir: str) -> str:
    """Raises before any work if ``WORKDIR/eval.json`` could not be written; returns its path."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir {workdir} is not a directory")
    out = os.path.join(workdir, EVAL_FILE)
    if os.path.isdir(out):
        raise IsADirectoryError(f"{out} is a directory: the result could not be saved there")
    try:
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise PermissionError(f"--workdir {workdir} is not writable: {out} could not be saved "
                              f"({error.strerror or error})") from None
    return out


def write_eval(workdir: str, result: dict) -> tuple[str, str | None]:
    """Writes ``result`` to ``WORKDIR/eval.json``; a previous one is kept as ``eval.<its mtime>.json``.

    Returns ``(path, backup path or None)``. The new file is written beside it first and moved
    into place, so an interrupted write leaves the previous result intact.
    """
    out = check_eval_output(workdir)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix="eval.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    backup = None
    if os.path.exists(out):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(out)))
        backup, i = os.path.join(workdir, f"eval.{stamp}.json"), 1
        while os.path.exists(backup):
            backup, i = os.path.join(workdir, f"eval.{stamp}-{i}.json"), i + 1
        os.replace(out, backup)
    os.replace(tmp, out)
    return out, backup


def evaluate_workdir(workdir: str, *, num_examples: int = 64, ode_examples: int = 8, batch_size: int = 64,
                     seed: int = 0, rtol: float = 1e-3, atol: float = 1e-3, ema: float | None = None,
                     progress: bool = True) -> dict:
    """Bits/dim of the first ``num_examples`` training examples (data order of ``seed``) under the EMA model.

    * ``vlb_bpd``: the variational bound (``T`` network calls per batch), over ``num_examples``.
    * ``ode_bpd``: the exact NLL through the probability-flow ODE with a Hutchinson trace
      estimate and uniform dequantization, over the first ``ode_examples`` (adaptive solver;
      its NFE is reported).

    A class-conditional model is evaluated unconditionally (the null label). ``ema``: a ``sigma_rel``
    whose post-hoc EMA reconstruction is evaluated instead of the run's EMA (``load_workdir``).
    Only models of an objective with a discrete schedule (``objective.discrete``: diffusion) have
    these likelihoods here (ValueError naming the objective otherwise). ``progress``: a progress
    bar on stderr, one step per batch of the bound (``"bits/dim (bound)"``) and one for the ODE
    solve (``"bits/dim (PF-ODE)"``, adaptive, so one step for the whole solve).
    """
    if num_examples <= 0 or ode_examples < 0 or batch_size <= 0:
        raise ValueError(f"num_examples and batch_size must be positive and ode_examples >= 0, got "
                         f"{num_examples}, {batch_size}, {ode_examples}")
    wd = load_workdir(workdir, ema=ema)
    run, config, objective = wd.run, wd.config, wd.run.objective
    if "discrete" not in objective.views:
        raise ValueError(f"{workdir} trained an objective={objective.name!r} model: the variational bound and the "
                         f"PF-ODE bits/dim here need an objective with a discrete schedule "
                         f"(one of {[n for n, o in objectives.OBJECTIVES.items() if 'discrete' in o.views]})")
    schedule, prediction, learned = objective.schedule, objective.prediction, objective.learned_variance
    images = data.get_batch(run.source, 0, global_batch_size=num_examples, seed=seed,
                            image_size=config.data.image_size or None)["image"]
    c = run.image_shape[-1]
    model_fn = run.network(wd.ema_params)  # unconditional: the null label of a class-conditional model
    eps_fn = (lambda x, t: model_fn(x, t)[..., :c]) if learned else model_fn
    variance = "learned_range" if learned else "fixed_large"
    key = jax.random.key(seed)
    vlb = likelihood.variational_bound_bpd(schedule, model_fn, images, jax.random.fold_in(key, 0),
                                           batch_size=batch_size, prediction=prediction, variance=variance,
                                           progress=progress)
    out = {"vlb_bpd": float(vlb["bpd"]), "vlb_prior_bpd": float(vlb["prior_bpd"]), "num_examples": num_examples,
           "vlb_variance": variance}
    if ode_examples:
        ode = jax.jit(lambda x, k: likelihood.ode_bpd(schedule, eps_fn, x, k, prediction=prediction,
                                                      rtol=rtol, atol=atol))
        with tqdm(total=1, desc="bits/dim (PF-ODE)", unit="solve", disable=not progress) as bar:
            res = ode(jnp.asarray(images[:ode_examples]), jax.random.fold_in(key, 1))
            jax.block_until_ready(res)
            bar.update()
        out.update(ode_bpd=float(np.mean(res["bpd"])), ode_nfe=int(res["nfe"]), ode_examples=ode_examples)
    return out
