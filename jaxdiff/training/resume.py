"""Starting a run in a workdir: a writable folder, a config that may resume, and a record of each start.

A workdir holds one run. Resuming it with a config that changes the model, the objective or
the data would go on training the saved weights as something they are not, so the config saved
with the checkpoint is compared with the current one before the first step:

* the fields in ``CHANGEABLE_ON_RESUME`` (the length of the run, intervals, the learning
  rate, sampling, the sample-quality evaluation ``eval.*``, the parallel mode, ...) may change;
  none of them changes what the saved weights are; the changes are logged and recorded;
* every other field (everything under ``model``, ``diffusion`` and ``data`` except those listed,
  the ``seed``, ``train.global_batch_size``, ``train.label_dropout``, ``train.grad_clip`` and
  ``train.warmup_steps`` (both shape the optimizer's state), and
  any field this list does not name) must match, or :func:`check_resume` raises ``ValueError``
  listing each difference as ``field: saved -> current``.

A model field left unset (``None``: the preset's value) and the same value set explicitly count
as equal, and so do a field that a workdir written by an older version lacks and the library's
default value of it (:func:`jaxdiff.configs.default.get_config`).
Each start appends one line ``{"step", "time", "changes", "config"}`` to
``workdir/config_history.jsonl`` (:func:`record_start`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from jaxdiff.configs import default as default_config
from jaxdiff.models import PRESETS, UNet

__all__ = ["CHANGEABLE_ON_RESUME", "HISTORY_FILE", "check_writable", "config_changes", "check_resume",
           "record_start"]

# Config fields that may differ between a checkpoint's config and the config that resumes it.
# An entry ending in "." names a whole section.
CHANGEABLE_ON_RESUME = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_every", "train.learning_rate", "train.ema_decay",
    "data.prefetch", "data.data_dir", "data.vae", "model.remat", "model.conv_backward", "sample.", "eval.", "parallel.",
)
# Mixed precision and accumulation change the arithmetic, not what the weights are.
CHANGEABLE_ON_RESUME += ("train.compute_dtype", "train.microbatches", "train.peak_flops")
# Fields that older versions named otherwise: old name -> new name (a saved value is compared as the new field).
MOVED = {"model.dtype": "train.compute_dtype"}
HISTORY_FILE = "config_history.jsonl"


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` if needed and checks that files can be written in it.

    Raises NotADirectoryError (a file is in the way) or PermissionError / OSError naming ``workdir``.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir={workdir!r} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise type(error)(f"workdir={workdir!r} is not writable: {error.strerror or error}") from None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """Fills unset model overrides with the preset's values, so that None and the same value compare equal
    (and reads the fields of :data:`MOVED` under their new names)."""
    flat = dict(flat)
    for old, new in MOVED.items():
        value = flat.pop(old, None)
        if value is not None:
            flat.setdefault(new, value)
    preset = PRESETS.get(flat.get("model.preset") or "digits")
    if preset is None:
        return flat
    for name, field in UNet.__dataclass_fields__.items():
        key = f"model.{name}"
        if key in flat and flat[key] is None:
            value = preset.keywords.get(name, field.default)
            flat[key] = list(value) if isinstance(value, tuple) else value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs: ``{"section.name": (saved, current)}`` (absent fields: ``"<absent>"``).

    ``saved`` and ``current`` are config dicts (``ConfigDict.to_dict()`` or the saved JSON).
    """
    a = _effective(_flatten(json.loads(json.dumps(saved))))
    b = _effective(_flatten(json.loads(json.dumps(current))))
    defaults = _flatten(json.loads(json.dumps(default_config.get_config().to_dict())))
    for flat, other in ((a, b), (b, a)):  # a field added since one side was written, at its default
        for k in set(other) - set(flat):
            if k in defaults and other[k] == defaults[k]:
                flat[k] = defaults[k]
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def _changeable(field: str) -> bool:
    return any(field == c or (c.endswith(".") and field.startswith(c)) for c in CHANGEABLE_ON_RESUME)


def check_resume(saved: dict, current: dict, *, workdir: str, step: int) -> dict[str, tuple[Any, Any]]:
    """The allowed changes between ``saved`` (the checkpoint's config) and ``current``.

    Raises ValueError listing every difference in a field that cannot change on resume.
    """
    changes = config_changes(saved, current)
    fixed = {k: v for k, v in changes.items() if not _changeable(k)}
    if fixed:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise ValueError(
            f"the config differs from the one that trained workdir={workdir!r} (checkpoint of step {step}) "
            f"in fields that cannot change on resume (saved -> current):\n{lines}\n"
            f"To train this config, start a new run with another --workdir; to resume this run, use its "
            f"config ({os.path.join(workdir, 'config.json')}) with only the changes that "
            f"jaxdiff.training.resume.CHANGEABLE_ON_RESUME allows.")
    return changes


def record_start(workdir: str, step: int, config: dict, changes: dict[str, tuple[Any, Any]]) -> None:
    """Writes ``config.json`` (the config now running) and appends the start to ``config_history.jsonl``."""
    config = json.loads(json.dumps(config))
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "changes": {k: list(v) for k, v in changes.items()}, "config": config}
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
