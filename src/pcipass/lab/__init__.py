"""The lab: a real Linux kernel under QEMU with an emulated IOMMU and chosen PCI topologies."""
