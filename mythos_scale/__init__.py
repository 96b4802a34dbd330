"""mythos_scale: distributed pretraining of Recurrent-Depth Transformers."""

__version__ = "0.1.0"
