"""``zappos``: UT-Zappos50K's four binary shoe tasks (the paper's small-scale test).

The release has no binary labels file, so the tasks are read from a CSV you make once from its
metadata (``ut-zap50k-data/meta-data.csv``), in the ``csv`` layout (see ``attribute_csv``)::

    root/zappos_labels.csv   image,split,<4 task columns, 0/1>
                             e.g. image,split,type_shoes,gender_women,heel_high,closure_lace
                                  ut-zap50k-images/Shoes/Oxfords/Bostonian/100627.72.jpg,train,1,0,0,1
    root/ut-zap50k-images/   the images, at the paths given in the CSV (relative to root)

Which classes count as positive for each task (shoe type, suggested gender, heel height,
closing mechanism) and the train/val/test assignment are the CSV's; the paper uses the splits
of its references [34, 47].
"""
from __future__ import annotations

from .attribute_csv import load_attribute_csv
from .base import MultiTaskDataset

__all__ = ["load_zappos"]


def load_zappos(root=None, labels_file: str = "zappos_labels.csv", image_size=64, square_crop: bool = True,
                mean_samples: int = 1000) -> MultiTaskDataset:
    """UT-Zappos50K from ``root/zappos_labels.csv`` (layout above); ``hflip`` on (shoes face both ways)."""
    return load_attribute_csv(root, labels_file, image_size, 3, True, square_crop, mean_samples, name="zappos")
