"""Triton kernels of lapdtr, installed as ``lapdtr.kernels``. Importing this never needs Triton;
each kernel has a PyTorch reference and ``LAPDTR_KERNELS=0`` turns kernels off."""
