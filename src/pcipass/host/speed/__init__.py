"""Speed-ups that change nothing a caller sees: fan-out over CPUs."""
