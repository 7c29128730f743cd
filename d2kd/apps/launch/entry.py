"""The command line both training entry points share (detectron2's argument parser)."""
import sys
from typing import Callable, Optional, Sequence

from detectron2.engine import default_argument_parser

from ...config.loading import one_line
from .distributed import launch


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
