"""A userspace driver library over the kernel's VFIO (container/group and cdev+iommufd)."""
