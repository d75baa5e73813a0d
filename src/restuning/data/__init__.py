"""Classification data: the shipped sets, user sources (image folders, CSV/JSONL, local HF datasets),
deterministic splits, few-shot sampling and torch-only augmentation."""

from .labelled import LabelledData
from .shipped import SHIPPED, digits, mnist5k, tweets
from .sources import hf_dataset, image_folder, text_table
from .splits import few_shot, split_indices, vtab_split
from .transforms import normalise, random_resized_crop

__all__ = [
    "LabelledData", "SHIPPED", "digits", "few_shot", "hf_dataset", "image_folder", "mnist5k", "normalise",
    "random_resized_crop", "split_indices", "text_table", "tweets", "vtab_split",
]
