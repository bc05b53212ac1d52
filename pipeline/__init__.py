"""maepipe: Masked Autoencoder pretraining that streams, scales and survives preemption."""

__version__ = "0.1.0"
