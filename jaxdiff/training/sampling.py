"""The run's sampling function, in one place: network -> guidance -> the objective's denoiser -> a sampler.

:func:`generate` is the pure function (jittable; ``num_steps``, ``eta`` and ``guidance_scale`` may
be traced). :class:`Sampling` binds a run's settings to it once (``Run.sampling``, checked when
built); the training loop's sample grids, the FID evaluation, ``sample_workdir`` and
``scripts/eval.py`` all draw through it, so they draw the same samples for the same key.

A model's conditionality is explicit: ``num_classes`` says whether the model is class-conditional,
and when ``apply_fn`` is a bound ``UNet.apply`` its ``num_classes`` must agree (``ValueError``
otherwise), so labels and guidance are never silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks, guidance, samplers
from jaxdiff.objectives import Objective

__all__ = ["generate", "network", "check_overrides", "check_options", "option_names", "Sampling"]


def option_names(names, *, prefix: str = "") -> list[str]:
    """How a message names sampler options: ``eta`` as ``prefix + "eta"``, every other option as
    ``prefix + name``, except on the command line (``prefix="--"``), where ``eta`` is the flag
    ``--eta`` and the others are set by ``--option NAME=...`` (``scripts/sample.py``)."""
    if prefix != "--":
        return [prefix + k for k in names]
    return ["--eta" if k == "eta" else f"--option {k}=..." for k in names]


def check_options(sampler: str, options: Mapping | None = None, *, eta=None, prefix: str = "") -> None:
    """``ValueError`` if ``options`` (or a given ``eta``) holds a name that ``sampler`` does not take.

    The names the sampler takes are its registry entry's (:attr:`jaxdiff.samplers.registry.Sampler.options`);
    the message names them as the caller sets them (:func:`option_names`: ``--eta`` and
    ``--option order=...`` for ``prefix="--"``). An unknown ``sampler`` passes (the registry's
    check names it).
    """
    if sampler not in samplers.SAMPLERS:
        return
    allowed = tuple(samplers.SAMPLERS[sampler].options)
    given = [*(options or {}), *(["eta"] if eta is not None else [])]
    bad = sorted(k for k in given if k not in allowed)
    if bad:
        takes = ", ".join(option_names(allowed, prefix=prefix)) or "no options"
        raise ValueError(f"sampler {sampler!r} does not take {', '.join(option_names(bad, prefix=prefix))}; "
                         f"it takes {takes}")


def network(apply_fn: Callable, params, labels, *, num_classes: int | None, guidance_scale=1.0,
            guided_channels: int | None = None) -> Callable:
    """``net(x [N, ...], time [N]) -> [N, ...]``: the model with ``params`` and ``labels`` ``[N]`` bound.

    A class-conditional model (``num_classes`` set) is guided with the library's one formula
    (:func:`jaxdiff.guidance.classifier_free_guidance`, scale ``guidance_scale >= 0``; ``1``: the
    conditional model) on its first ``guided_channels`` output channels; an unconditional one
    ignores ``labels`` but their number.
    """

    def net(x, t, y):
        return apply_fn({"params": params}, x, t, y, train=False)

    if num_classes is None:
        return functools.partial(net, y=None)
    return guidance.classifier_free_guidance(net, labels, num_classes, guidance_scale,
                                             guided_channels=guided_channels)


def generate(objective: Objective, apply_fn: Callable, params, key, labels, image_shape, *, sampler: str = "ddim",
             num_steps=50, eta=0.0, guidance_scale=1.0, num_classes: int | None = None, clip_x0: bool = True,
             options: Mapping | None = None) -> jax.Array:
    """Samples ``[N, H, W, C]`` float images in about ``[-1, 1]``.

    Args:
      objective: what the model was trained with (:mod:`jaxdiff.objectives`); it turns the
        network into the denoiser every sampler takes.
      apply_fn: a Flax ``apply`` of a :class:`jaxdiff.models.UNet` (``(variables, x, t, y, train=)``).
      labels: ``[N]`` int labels in ``[0, num_classes)`` (checked when concrete); only their
        number is used by an unconditional model (``num_classes=None``).
      image_shape: static ``(H, W, C)``.
      sampler: a name in :data:`jaxdiff.samplers.SAMPLERS` that serves ``objective``
        (``objective.sampler_names()``).
      eta: forwarded only to samplers that take it (``ddim``, ``euler_ancestral``); must be >= 0.
      guidance_scale: classifier-free guidance scale ``w >= 0`` of a class-conditional model
        (1 = the conditional model); a concrete value other than 1 on an unconditional model raises.
        Guidance combines the network's outputs, which is the same affine combination of the
        denoiser's for every objective.
      num_classes: the model's number of classes (``None``: unconditional). When ``apply_fn`` is a
        bound method of a module with a ``num_classes`` field (``UNet.apply``) the two must agree.
      clip_x0: clip x0 estimates to ``[-1, 1]`` where the objective allows it (diffusion).
      options: the sampler's own options (:mod:`jaxdiff.samplers.registry`), e.g. ``{"s_churn": 40.0}``
        for ``edm``; ``eta`` fills in ``"eta"`` when the sampler takes it and ``options`` lacks it.

    Pure and jittable: wrap it in ``jax.jit`` with the objective, strings and shapes bound (e.g. by
    ``functools.partial``); ``num_steps``, ``eta`` and ``guidance_scale`` may stay traced.
    """
    spec = objective.check_sampler(sampler, options=options)
    _check_conditioning(apply_fn, labels, num_classes, guidance_scale)
    checks.check_nonnegative(eta, "eta")
    c = image_shape[-1]
    net = network(apply_fn, params, labels, num_classes=num_classes, guidance_scale=guidance_scale,
                  guided_channels=c)
    options = dict(options or {})
    if "eta" in spec.options:
        options.setdefault("eta", eta)
    shape = (labels.shape[0], *image_shape)
    return samplers.sample_denoiser(objective.denoiser(net, clip_x0=clip_x0), key, shape, sampler=sampler,
                                    num_steps=None if spec.adaptive else num_steps, **options)[0]


def _check_conditioning(apply_fn: Callable, labels, num_classes: int | None, guidance_scale) -> None:
    """Labels and guidance must mean something to the model (module docstring)."""
    model = getattr(apply_fn, "__self__", None)
    model_classes = getattr(model, "num_classes", num_classes)
    if model_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model of apply_fn has num_classes={model_classes}: "
                         f"pass the model's num_classes (None for an unconditional model)")
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [N] ints, got shape {jnp.shape(labels)}")
    if num_classes is None:
        w = checks.concrete_value(guidance_scale)
        if w is not None and np.any(w != 1.0):
            raise ValueError(f"guidance_scale={w.item() if w.size == 1 else w}: the model is unconditional "
                             f"(num_classes=None), so there is no classifier-free guidance; use 1")
    else:
        checks.check_int_range(labels, "labels", 0, num_classes - 1, f" (num_classes={num_classes})")


def check_overrides(objective: Objective, num_classes: int | None, sampler: str, *, num_steps: int | None = None,
                    eta: float | None = None, guidance_scale: float | None = None, options: Mapping | None = None,
                    prefix: str = "") -> None:
    """Checks settings that override a model's sampling defaults (``None``: not overridden), before any work.

    ``ValueError`` naming ``prefix + setting`` (``--eta`` for a script): a sampler that does not serve
    ``objective``, an option it does not take (``eta`` included), ``num_steps < 1``, ``eta < 0``,
    guidance for an unconditional model (``num_classes=None``).
    """
    check_options(sampler, options, eta=eta, prefix=prefix)
    opts = {**(options or {}), **({} if eta is None else {"eta": eta})}
    objective.check_sampler(sampler, num_steps=num_steps, options=opts, prefix=prefix)
    if eta is not None and eta < 0:
        raise ValueError(f"{prefix}eta must be >= 0, got {eta}")
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError(f"{prefix}guidance must be >= 0, got {guidance_scale}")
    if guidance_scale is not None and num_classes is None:
        raise ValueError(f"{prefix}guidance: the model is unconditional (no classifier-free guidance)")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit(sampling) caches on it
class Sampling:
    """A run's sampling settings bound to :func:`generate`; built (and checked) by ``Run.sampling``.

    ``sampling(params, key, labels)`` draws ``[N, H, W, C]`` images for ``labels`` ``[N]`` with one
    key; :meth:`per_example` draws example ``indices[b]`` from ``fold_in(key, indices[b])`` alone,
    so that a large evaluation does not depend on its batch size or device count. Both are pure.
    """

    objective: Objective
    apply_fn: Callable
    image_shape: tuple[int, int, int]
    num_classes: int | None
    sampler: str
    num_steps: int | None
    eta: float
    guidance_scale: float
    clip_x0: bool
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, params, key, labels) -> jax.Array:
        return generate(self.objective, self.apply_fn, params, key, labels, self.image_shape, sampler=self.sampler,
                        num_steps=self.num_steps, eta=self.eta, guidance_scale=self.guidance_scale,
                        num_classes=self.num_classes, clip_x0=self.clip_x0, options=dict(self.options))

    def batches(self, params, key, labels, batch_size: int) -> Iterator[jax.Array]:
        """The samples of ``labels`` ``[N]``, ``batch_size`` at a time: batch ``i`` (``labels[i * batch_size:
        (i + 1) * batch_size]``) from ``fold_in(key, i)``, one compiled function (``jax.jit`` of this object)."""
        labels = np.asarray(labels)
        fn = jax.jit(self)
        for i, start in enumerate(range(0, labels.shape[0], batch_size)):
            yield fn(params, jax.random.fold_in(key, i), jnp.asarray(labels[start:start + batch_size]))

    def per_example(self, params, key, indices, labels) -> jax.Array:
        """``[B, H, W, C]``: example ``b`` from ``fold_in(key, indices[b])`` and ``labels[b]``."""
        return jax.vmap(lambda i, y: self(params, jax.random.fold_in(key, i), y[None])[0])(indices, labels)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings a report names (``sampler``, ``num_steps``, ``eta``, ``guidance_scale``, the options)."""
        out = {"sampler": self.sampler, "num_steps": self.num_steps, "eta": self.eta,
               "guidance_scale": self.guidance_scale}
        return dict(out, options=dict(self.options)) if self.options else out
