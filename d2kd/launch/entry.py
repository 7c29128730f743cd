"""The command line both training entry points share (detectron2's argument parser)."""
import sys
from typing import Callable, Optional, Sequence

from detectron2.engine import default_argument_parser

from ..config import ConfigError
from .distributed import launch

#: the longest error line (a message that runs longer is cut, saying so)
MAX_LINE = 600


def one_line(error: BaseException) -> str:
    """``error`` as one short line: a :class:`ConfigError`'s message, any other exception's
    type and message (whitespace folded, cut at :data:`MAX_LINE` characters)."""
    text = " ".join(str(error).split())
    if not isinstance(error, ConfigError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 15] + " ... (cut)"


def run_cli(main: Callable, prepare: Callable, argv: Optional[Sequence[str]] = None) -> None:
    """Parse detectron2's arguments; ``prepare(args)`` in the launching process (bad input:
    one line and exit status 1, before any process starts); then ``main(args)`` on every
    process ``launch`` starts."""
    args = default_argument_parser().parse_args(argv)
    try:
        prepare(args)
    except Exception as e:  # whatever the check raises is the one line, never a traceback
        sys.exit(f"error: {one_line(e)}")
    launch(main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
