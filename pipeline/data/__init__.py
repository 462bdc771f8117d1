"""The data: sources (Fashion-MNIST idx files, ImageFolder trees, Parquet shards, synthetic), splits, transforms,
checks, and the loaders that feed training (DataLoader, on-device batches, Ray Data)."""
from ..errors import DataError, find_data_error
from .checks import SCAN_LIMIT, check_dataset
from .fashion_mnist import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, FashionMNISTSplit, find_fashion_mnist, read_idx
from .image_datasets import TransformSubset, load_image_file
from .loaders import DATASETS, SyntheticDataset, build_datasets, example_batch, make_loader, resolve_loader
from .shards import ParquetImageDataset, write_parquet_shards
from .splits import DataSplits
from .transforms import IMAGENET_MEAN, IMAGENET_STD, TransformPolicy, imagenet_transforms

__all__ = [
    "DATASETS", "DataError", "DataSplits", "FASHION_CLASSES", "FASHION_MEAN", "FASHION_STD", "FashionMNISTSplit",
    "IMAGENET_MEAN", "IMAGENET_STD", "ParquetImageDataset", "SCAN_LIMIT", "SyntheticDataset", "TransformPolicy",
    "TransformSubset", "build_datasets", "check_dataset", "example_batch", "find_data_error", "find_fashion_mnist",
    "imagenet_transforms", "load_image_file", "make_loader", "read_idx", "resolve_loader", "write_parquet_shards",
]
