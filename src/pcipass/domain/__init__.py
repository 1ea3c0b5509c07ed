"""Driver domains: a vfio-user backend (pcipass serve) and frontend (connect)."""
