"""One training loop: any family's ``loss`` over any batch source, on one process or many.

A recipe (``train/recipes/<name>.py``) is configuration: a :class:`Recipe` naming the
family (``models.<family>.FAMILY``), its flag defaults, how to build the config and the
data from the flags (:class:`Job`), and how to evaluate (:class:`Evaluation`). The loop
(:func:`run`) does the rest for all of them: the shared flags (:mod:`train.loop.flags`),
the pure compiled step or DDP / FSDP2 / activation checkpointing / bf16-mixed through
``fmm.adapter`` (:mod:`train.loop.engine`), the family's train state, checkpoints with
exact resume, the progress bar, ``metrics.jsonl`` and TensorBoard
(:mod:`train.loop.records`), and the saved run, which :func:`load_run` reads back.

Example (a recipe)::

    RECIPE = Recipe(name="clip", help="...", family=clip.FAMILY,
                    defaults=Defaults(steps=600, batch_size=128, lr=1e-3, weight_decay=0.1,
                                      warmup=50, min_batch_size=2),
                    prepare=prepare, evaluate=evaluate)
"""

from train.loop.flags import Defaults, add_train_arguments, config_defaults
from train.loop.load import Run, load_run
from train.loop.run import Evaluation, Job, Recipe, run
from train.loop.source import BatchSource, SeededSource

__all__ = [
    "BatchSource",
    "Defaults",
    "Evaluation",
    "Job",
    "Recipe",
    "Run",
    "SeededSource",
    "add_train_arguments",
    "config_defaults",
    "load_run",
    "run",
]
