"""Registries of the DetKDS search space (extendable from projects/, like heads)."""
from detectron2.utils.registry import Registry


class NamedRegistry(Registry):
    """A registry whose entries are registered under an explicit name (genome tokens)."""

    def register(self, name: str):  # type: ignore[override]
        def deco(fn):
            self._do_register(name, fn)
            return fn
        return deco

    def names(self):
        return sorted(name for name, _ in self)


SLOT_OPS = {slot: NamedRegistry(f"DETKDS_SLOT{slot}") for slot in (1, 2, 3)}
DISTANCES = NamedRegistry("DETKDS_DISTANCE")
KNOWLEDGE_INPUTS = ("global", "fgbg", "instance", "logit", "loc")
WEIGHTS = (0.1, 0.5, 1, 2, 5, 10, 20, 50)
