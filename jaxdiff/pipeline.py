"""A model ready to sample: its objective, network, parameters, image shape and sampling defaults.

:class:`Pipeline` is what one holds of a trained model: ``pipe.sample(key, n)`` draws ``n``
images through the library's one sampling function (:func:`jaxdiff.training.sampling.generate`,
bound by :class:`~jaxdiff.training.sampling.Sampling`), the one the training job's sample grids,
``sample_workdir`` and the FID evaluation use, so the same key gives the same images.
``load_workdir(W).pipeline`` (the run's EMA parameters and ``config.sample``) and
``from_diffusers_pipeline(F).pipeline`` (the scheduler's settings) are pipelines; for a model of
one's own, build one::

    pipe = jaxdiff.Pipeline(jaxdiff.objectives.Diffusion(schedule=jaxdiff.linear_schedule(1000)), unet.apply,
                            params, (32, 32, 3), num_classes=10, sampler="dpm_solver++", num_steps=20)
    images = pipe.sample(jax.random.key(0), 16, labels=3, guidance=2.0)  # float32 [16, 32, 32, 3]
    jaxdiff.to_uint8(images)                                             # uint8, ready to save

``apply_fn`` is called as ``apply_fn({"params": params}, x [B, H, W, C], t [B], y [B] | None,
train=False)`` (a :class:`jaxdiff.models.UNet`'s ``apply``; a model of one's own takes the same
arguments); a class-conditional model takes the null label ``num_classes`` for classifier-free
guidance (train it with :func:`jaxdiff.guidance.drop_labels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks, data
from jaxdiff.objectives import Objective

__all__ = ["Pipeline"]


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A model with its parameters and sampling defaults; :meth:`sample` draws images.

    ``objective``: what the model was trained with (:mod:`jaxdiff.objectives`); ``apply_fn`` and
    ``params``: the network (module docstring); ``image_shape``: ``(H, W, C)``; ``num_classes``: the
    classes of a class-conditional model (``None``: unconditional). The sampling defaults
    (``sampler``, ``num_steps``, ``eta``, ``guidance``, ``clip_x0``, and ``options``, the default
    sampler's own options) are what :meth:`sample` uses when not given; they are checked when the
    pipeline is built (``ValueError`` naming the field).
    """

    objective: Objective
    apply_fn: Callable
    params: Any
    image_shape: tuple[int, int, int]
    num_classes: int | None = None
    sampler: str = "ddim"
    num_steps: int | None = 50  # None: the sampler's default
    eta: float = 0.0  # for the samplers that take one
    guidance: float = 1.0  # classifier-free guidance scale w (1: the conditional model)
    clip_x0: bool = True
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        from jaxdiff.training.sampling import check_overrides

        shape = tuple(self.image_shape)
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape!r}")
        for size in shape:
            _positive_int(size, "image_shape")
        object.__setattr__(self, "image_shape", shape)
        if self.num_classes is not None:
            _positive_int(self.num_classes, "num_classes")
        spec = self.objective.check_sampler(self.sampler, options=self.options)
        check_overrides(self.objective, self.num_classes, self.sampler, eta=self.eta if "eta" in spec.options else None,
                        num_steps=None if spec.adaptive else self.num_steps, options=self.options)
        if self.num_classes is None and self.guidance != 1.0:
            raise ValueError(f"guidance={self.guidance}: the model is unconditional (num_classes=None); use 1")

    @classmethod
    def from_sampling(cls, sampling, params) -> Pipeline:
        """The pipeline of a :class:`~jaxdiff.training.sampling.Sampling` (e.g. ``Run.sampling()``) and ``params``."""
        return cls(objective=sampling.objective, apply_fn=sampling.apply_fn, params=params,
                   image_shape=sampling.image_shape, num_classes=sampling.num_classes, sampler=sampling.sampler,
                   num_steps=sampling.num_steps, eta=sampling.eta, guidance=sampling.guidance_scale,
                   clip_x0=sampling.clip_x0, options=dict(sampling.options))

    def sampling(self, *, sampler: str | None = None, num_steps: int | None = None, eta: float | None = None,
                 guidance: float | None = None, options: Mapping | None = None, prefix: str = ""):
        """The :class:`~jaxdiff.training.sampling.Sampling` of these defaults with the overrides that are not None.

        Checked before any work (``ValueError`` naming ``prefix + setting``). ``options`` are added to
        the default options when ``sampler`` is the default one and replace them otherwise. The same
        settings give the same object, so its compiled function is reused.
        """
        from jaxdiff.training.sampling import Sampling, check_overrides

        name = sampler or self.sampler
        check_overrides(self.objective, self.num_classes, name, num_steps=num_steps, eta=eta,
                        guidance_scale=guidance, options=options, prefix=prefix)
        opts = {**(self.options if name == self.sampler else {}), **(options or {})}
        settings = dict(sampler=name, num_steps=self.num_steps if num_steps is None else num_steps,
                        eta=self.eta if eta is None else eta,
                        guidance_scale=self.guidance if guidance is None else guidance)
        key = (tuple(sorted(settings.items())), tuple(sorted(opts.items())))
        if key not in self._cache:
            self._cache[key] = Sampling(objective=self.objective, apply_fn=self.apply_fn, image_shape=self.image_shape,
                                        num_classes=self.num_classes, clip_x0=self.clip_x0, options=opts, **settings)
        return self._cache[key]

    def labels(self, n: int, labels=None) -> np.ndarray:
        """int32 ``[n]`` labels of :meth:`sample`: ``labels`` (``[n]`` ints, or one int for all), or by
        default the sample grid's order (:func:`jaxdiff.training.images.grid_labels`: ``n // num_classes``
        rows, row ``r`` of class ``r mod num_classes``), zeros for an unconditional model."""
        from jaxdiff.training.images import grid_labels

        _positive_int(n, "n")
        if labels is None:
            return grid_labels(n, self.num_classes)
        if self.num_classes is None:
            raise ValueError("labels: the model is unconditional (num_classes=None); leave labels out")
        arr = np.asarray(labels)
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
            raise ValueError(f"labels must be one int or [n] ints, got dtype {arr.dtype} and shape {arr.shape}")
        arr = np.broadcast_to(arr, (n,)) if arr.ndim == 0 else arr
        if arr.shape != (n,):
            raise ValueError(f"labels must have shape [n]=({n},), got {arr.shape}")
        checks.check_int_range(arr, "labels", 0, self.num_classes - 1, f" (num_classes={self.num_classes})")
        return arr.astype(np.int32)

    def sample(self, key, n: int, *, labels=None, guidance: float | None = None, sampler: str | None = None,
               num_steps: int | None = None, batch_size: int = 256, **options) -> jax.Array:
        """Draws ``n`` images: float32 ``[n, H, W, C]`` in about ``[-1, 1]`` (:func:`~jaxdiff.data.to_uint8` quantizes).

        Args:
          key: a PRNG key. Batch ``i`` of ``batch_size`` images is drawn from ``fold_in(key, i)``, as
            ``sample_workdir(seed=s)`` draws from ``key(s)``: the same key gives its images.
          n: the number of images.
          labels: class labels of a class-conditional model: ``[n]`` ints, or one int for all;
            default: the sample grid's order (:meth:`labels`).
          guidance, sampler, num_steps: override the defaults (``None``: the pipeline's).
          options: the sampler's own options (e.g. ``eta=0.5`` for ``ddim``, ``s_churn=40`` for ``edm``).
        Every argument is checked before any work; each new combination of settings compiles once.
        """
        checks.check_key(key)
        _positive_int(batch_size, "batch_size")
        eta = options.pop("eta", None)
        sampling = self.sampling(sampler=sampler, num_steps=num_steps, eta=eta, guidance=guidance, options=options)
        ys = self.labels(n, labels)
        out = list(sampling.batches(self.params, key, ys, batch_size))
        return out[0] if len(out) == 1 else jnp.concatenate(out)

    def sample_uint8(self, key, n: int, **kwargs) -> np.ndarray:
        """:meth:`sample` quantized by :func:`~jaxdiff.data.to_uint8`: uint8 ``[n, H, W, C]``, ready to save."""
        return data.to_uint8(self.sample(key, n, **kwargs))
