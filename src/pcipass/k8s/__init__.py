"""pcipass behind the kubelet: a DRA kubelet plugin, a device plugin and ResourceSlices
(the `pcipass[k8s]` extra; see docs/fleet.md)."""
