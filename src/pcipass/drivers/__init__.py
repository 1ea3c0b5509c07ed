"""Reference drivers written only against pcipass.device.Device."""
