"""FPN level names ("p2" ... "p7", detectron2's): the one place that reads them."""


def level_id(name: str) -> int:
    """An FPN level's index from its name: "p3" -> 3 (log2 of its stride)."""
    if len(name) < 2 or name[0] != "p" or not name[1:].isdigit():
        raise ValueError(f"{name!r} is not an FPN level name like 'p3'.")
    return int(name[1:])
