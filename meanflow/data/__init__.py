"""Data: datasets (2-D toys, digits, MNIST, image folders, latent shards), the resumable batch iterator, and the
latent pipeline (`meanflow prepare-latents`)."""
from .datasets import BatchIterator, Dataset, build_dataset

__all__ = ["BatchIterator", "Dataset", "build_dataset"]
