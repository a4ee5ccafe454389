"""Fully connected CRF (mean field on the permutohedral lattice), on the CPU and on CUDA."""
