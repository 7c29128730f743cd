"""The proxy's starting checkpoint, trained without the held-out images.

A DetKDS proxy trial starts from ``DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS``, typically the
student's own checkpoint part-way through its schedule. Trained on the whole training split,
that checkpoint has seen the images the proxy validates on (``VAL_SOURCE: train_holdout``).
:func:`train_proxy_start` trains the student config on the training split *minus* those
held-out images (the registered ``<train>_proxy_train_0_<m>_<seed>``, the same permutation the
proxy draws its subsets from), into the folder ``PROXY_WEIGHTS`` names, so that no image the
proxy scores on took part in any training of the student (the teacher's training is not
changed). ``tools/search_net.py --config-file SEARCH.yaml --train-proxy-start STUDENT.yaml``.
"""
import os
import re
from typing import Sequence

from ...config import ConfigError, load_config
from ..launch.entry import run_cli
from ..launch.train_net import main as train_main
from ..launch.train_net import prepare_run
from .proxy import register_holdout_split

_CHECKPOINT = re.compile(r"model_(\d{7})\.pth$")


def train_proxy_start(search_config: str, opts: Sequence[str], student_config: str) -> str:
    """Train ``student_config`` on the proxy's side of the held-out split of ``search_config``
    (with ``opts``) into ``dirname(PROXY_WEIGHTS)``, resuming a killed run; returns
    ``PROXY_WEIGHTS``.

    Raises:
        ConfigError: the search does not hold images out (``VAL_SOURCE``), ``PROXY_WEIGHTS``
            is not a periodic checkpoint of that run (``model_NNNNNNN.pth`` at a multiple of
            the student's ``SOLVER.CHECKPOINT_PERIOD``), or the student trains on another
            dataset than the search.
    """
    cfg = load_config(search_config, list(opts))
    search = cfg.DISTILL.DETKDS.SEARCH
    if search.VAL_SOURCE != "train_holdout":
        raise ConfigError(f"DISTILL.DETKDS.SEARCH.VAL_SOURCE is {search.VAL_SOURCE!r}: only "
                          "'train_holdout' holds images out of training.")
    match = _CHECKPOINT.search(os.path.basename(search.PROXY_WEIGHTS))
    student = load_config(student_config)
    if match is None or (int(match.group(1)) + 1) % student.SOLVER.CHECKPOINT_PERIOD:
        raise ConfigError(
            f"DISTILL.DETKDS.SEARCH.PROXY_WEIGHTS={search.PROXY_WEIGHTS!r} is not a checkpoint "
            f"the student's run saves (model_NNNNNNN.pth every SOLVER.CHECKPOINT_PERIOD="
            f"{student.SOLVER.CHECKPOINT_PERIOD} iterations of {student_config}); name one, "
            "e.g. output/<run>/model_0000199.pth.")
    source = cfg.DATASETS.TRAIN[0]
    if tuple(student.DATASETS.TRAIN) != (source,):
        raise ConfigError(f"{student_config} trains on {tuple(student.DATASETS.TRAIN)}, the "
                          f"search on ({source!r},): give the student config of the search's "
                          "pair.")
    train, _ = register_holdout_split(source, 0, search.VAL_IMAGES, search.SUBSET_SEED)
    # in this process (launch() with one process does not start another), where the split
    # is registered
    run_cli(train_main, prepare_run,
            ["--config-file", student_config, "--resume", "DATASETS.TRAIN", f"('{train}',)",
             "OUTPUT_DIR", os.path.dirname(search.PROXY_WEIGHTS) or "."])
    return search.PROXY_WEIGHTS
