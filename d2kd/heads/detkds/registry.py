"""Registries of the DetKDS search space (extendable from projects/, like heads)."""
from typing import List

from detectron2.utils.registry import Registry


class NamedRegistry(Registry):
    """A registry whose entries are registered under an explicit name (genome tokens).

    An entry is either one of the paper's search space (``paper=True``: the ops and distances
    of the authors' release) or an extension (d2kd's variants, a project's registrations): a
    genome may use any entry, a search draws from the paper's unless told otherwise
    (``DISTILL.DETKDS.SEARCH.EXTRA_OPS``).
    """

    def __init__(self, name: str):
        super().__init__(name)
        self._paper: set = set()

    def register(self, name: str, paper: bool = False):  # type: ignore[override]
        def deco(fn):
            self._do_register(name, fn)
            if paper:
                self._paper.add(name)
            return fn
        return deco

    def names(self, paper_only: bool = False) -> List[str]:
        """Every registered name, sorted; only the paper's with ``paper_only``."""
        return sorted(name for name, _ in self if not paper_only or name in self._paper)


SLOT_OPS = {slot: NamedRegistry(f"DETKDS_SLOT{slot}") for slot in (1, 2, 3)}
DISTANCES = NamedRegistry("DETKDS_DISTANCE")
KNOWLEDGE_INPUTS = ("global", "fgbg", "instance", "logit", "loc")
WEIGHTS = (0.1, 0.5, 1, 2, 5, 10, 20, 50)
