"""Runs the training script with a step hook that sends SIGTERM to this process at a fixed step.

    python tests/signal_at_step.py STEP [train script flags...]

The SIGTERM tests (tests/test_resume.py) start training through this file, so that the signal
arrives at a known step (``train_and_evaluate(..., hooks=...)``) instead of at a moment that
races the run: they never find the run finished before the signal.
"""

import os
import runpy
import signal
import sys

from jaxdiff.training import loop


def main() -> None:
    at = int(sys.argv.pop(1))
    train = loop.train_and_evaluate

    def hook(step: int) -> None:
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    def with_hook(config, workdir, **kwargs):
        return train(config, workdir, hooks=[hook], **kwargs)

    loop.train_and_evaluate = with_hook  # the script looks it up when it runs
    runpy.run_module("jaxdiff.scripts.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
