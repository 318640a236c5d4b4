"""The training job: config -> run (:mod:`~jaxdiff.training.setup`), the pure step
(:mod:`~jaxdiff.training.step`), data parallelism and the fsdp mode
(:mod:`~jaxdiff.training.parallel`, the only module that knows pmap and meshes), the memory per
device (:mod:`~jaxdiff.training.memory`), orbax checkpoints (:mod:`~jaxdiff.training.checkpoint`),
the loop (:mod:`~jaxdiff.training.loop`) with its start-up checks (:mod:`~jaxdiff.training.resume`)
and clean stops on signals (:mod:`~jaxdiff.training.preemption`), and generating from / evaluating a
workdir (:mod:`~jaxdiff.training.generate`, :mod:`~jaxdiff.training.workdir`,
:mod:`~jaxdiff.training.evaluate`).
"""

from jaxdiff.training.evaluate import evaluate_workdir
from jaxdiff.training.generate import sample_images, sample_workdir
from jaxdiff.training.loop import train_and_evaluate
from jaxdiff.training.setup import Run, get_config, resolve
from jaxdiff.training.state import TrainState, create_train_state, make_optimizer
from jaxdiff.training.step import train_step
from jaxdiff.training.workdir import Workdir, load_workdir

__all__ = [
    "train_and_evaluate", "get_config", "resolve", "Run", "load_workdir", "Workdir", "sample_images",
    "sample_workdir", "evaluate_workdir", "train_step", "TrainState", "create_train_state", "make_optimizer",
]
