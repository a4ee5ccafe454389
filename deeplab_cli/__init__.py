"""deeplab: DeepLab v2 semantic segmentation with a fully connected CRF on the GPU."""

__version__ = "0.1.0"
