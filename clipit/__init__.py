"""clipit: CLIP-IT training suite for computational pathology."""

__version__ = "0.1.0"
