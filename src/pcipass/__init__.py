"""pcipass: PCI pass-through for Linux VFIO and Xen pciback.

Parts (see docs/ and the README):
  host     - sysfs inventory, IOMMU groups, verdicts, crash-safe claim/release, boot-time hiding
  vfio     - a userspace driver library over the kernel's VFIO
  domain   - driver domains: a vfio-user backend and frontend
  models   - devices emulated in Python, served by the same backend
  drivers  - reference drivers written against the Device interface (pcipass.device)
  lab      - boots a real kernel under QEMU with an emulated IOMMU to prove all of it
"""

__version__ = "0.1.0"
