"""edgeenc: ESP's BEATs and EAT bioacoustic encoders on edge devices and plain CPUs."""

__version__ = "0.1.0"
