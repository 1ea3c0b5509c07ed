"""The host model, read from sysfs (and /proc) under a root: PCI devices, IOMMU groups,
the IOMMU, pci.ids names, what the host uses a device for, and who holds it."""
