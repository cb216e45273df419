"""Fine-tuning SAM on your own masks (the SAM paper's recipe) and the datasets it reads.

* `data` - COCO instances, SA-1B JSON and PNG-mask folders -> `SegmentationDataset`;
* `prompts` - box noise, points inside a mask and in the error region, the round schedule;
* `losses` - focal + dice (20:1) + IoU-head MSE, lowest-loss mask for ambiguous prompts;
* `embedding_cache` - image features computed once and memory-mapped;
* `trainer` - `finetune(model, train, out_dir, val, TrainConfig(...))`, a plain PyTorch loop;
* `synthetic` - a toy dataset of textured shapes on photos.

Quality is measured by `sam.evaluation` (click protocol, mIoU).
"""

from .data import AnnotationError, SegmentationDataset, load_coco, load_dataset, load_png_folder, load_sa1b
from .trainer import FinetuneResult, TrainConfig, finetune, merged_state_dict

__all__ = [
    "AnnotationError",
    "FinetuneResult",
    "SegmentationDataset",
    "TrainConfig",
    "finetune",
    "load_coco",
    "load_dataset",
    "load_png_folder",
    "load_sa1b",
    "merged_state_dict",
]
