"""The classes of a detector: their names and the dataset's category id of each class index."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Classes:
    """Class index i (0..K-1) is called ``names[i]`` and is category ``category_ids[i]`` of the dataset's
    annotation files (COCO's ids run 1..90 with gaps; a YOLO dataset's are 0..K-1). ``category_ids`` defaults
    to 0..K-1."""

    names: list[str]
    category_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", [str(name) for name in self.names])
        ids = [int(i) for i in self.category_ids] or list(range(len(self.names)))
        object.__setattr__(self, "category_ids", ids)
        if not self.names:
            raise ValueError("Classes: at least one class name is needed")
        if len(ids) != len(self.names):
            raise ValueError(f"Classes: {len(ids)} category ids for {len(self.names)} names")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Classes: category ids repeat: {ids}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def anonymous(cls, num_classes: int) -> Classes:
        """Classes named "0".."K-1" with category ids 0..K-1."""
        return cls([str(i) for i in range(num_classes)])
