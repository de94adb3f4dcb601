"""Triton kernels of lapdtr, installed as ``lapdtr.kernels`` (setup.py ``package_dir``).

Importing this package never needs Triton. Each kernel lands here beside its PyTorch reference,
with tests of one against the other (the summarization issue brings the first ones).
"""
