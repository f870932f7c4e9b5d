"""Detection data: data-set YAMLs, label scan, dataset + loaders, augmentations, caches (see utils/data/*.py)."""

from utils.data.config import load_data_config
from utils.data.detect import CacheSizeError, DetectionDataset, create_dataloader, load_hyp
from utils.data.scan import ScanReport, list_image_files, scan_dataset

__all__ = ["CacheSizeError", "DetectionDataset", "ScanReport", "create_dataloader", "list_image_files",
           "load_data_config", "load_hyp", "scan_dataset"]
