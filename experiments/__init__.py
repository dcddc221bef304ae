"""Experiments that train with vlmcredit's weights (not part of the installed package)."""
