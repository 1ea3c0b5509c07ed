"""The verdict over the model: can a device or group be passed through, and if not, why."""
