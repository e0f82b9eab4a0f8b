"""duboko: deep learning from the primer to the cluster, on one engine."""

__version__ = "0.1.0"
