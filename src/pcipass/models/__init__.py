"""Devices emulated in Python, served by the vfio-user backend."""
