# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Data for I-JEPA, one job per module:

- `sources.py`: datasets through `datasets` (hub, local imagefolder / parquet, the embedded digits default), column
  standardisation, hub reachability, per-process shards of a stream;
- `images.py`: decoding (libjpeg-turbo through `simplejpeg`, PIL for the rest), random-resized-crop boxes, crop +
  resize, the default image processor and the pixel normalisation;
- `collators.py`: the pre-training and image-classification collators, on a shared base that skips and counts
  undecodable images;
- `token_buckets.py`: the shape policy for `torch.compile` (masks padded to a few token counts);
- `groups.py`: groups of related images (file-name convention, perceptual hashes) and the grouped reference / query
  split of the k-NN monitor;
- `labelled.py`: labelled training / evaluation splits, class names and class-balanced label subsets for evaluation
  and fine-tuning.

Every public name is importable from `modeling_ijepa.data`.
"""

from .collators import IJepaPretrainingCollator, ImageClassificationCollator
from .groups import GROUP_SEPARATOR, average_hash, group_from_file_name, group_split, hash_groups, image_groups
from .images import (
    PixelNormalizer,
    crop_and_resize,
    decode_image,
    decode_image_array,
    decode_random_crop,
    default_image_processor,
    random_resized_crop,
    random_resized_crop_box,
)
from .labelled import class_names, load_classification_datasets, sample_label_fraction
from .sources import (
    DIGITS_TEST_SIZE,
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    digits_split,
    hub_is_reachable,
    load_digits_dataset,
    load_image_dataset,
    shard_for_process,
)
from .token_buckets import TokenBuckets, optimal_edges


__all__ = [
    "GROUP_SEPARATOR",
    "average_hash",
    "group_from_file_name",
    "group_split",
    "hash_groups",
    "image_groups",
    "DIGITS_TEST_SIZE",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "default_image_processor",
    "digits_split",
    "load_digits_dataset",
    "load_image_dataset",
    "hub_is_reachable",
    "shard_for_process",
    "decode_image",
    "decode_image_array",
    "decode_random_crop",
    "random_resized_crop",
    "random_resized_crop_box",
    "crop_and_resize",
    "PixelNormalizer",
    "IJepaPretrainingCollator",
    "ImageClassificationCollator",
    "TokenBuckets",
    "optimal_edges",
    "load_classification_datasets",
    "class_names",
    "sample_label_fraction",
]
