"""CUDA sources of deeplab's GPU kernels, shipped as package data (loaded by cupy.RawModule)."""
