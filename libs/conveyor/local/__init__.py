"""Running Conveyor on one machine: service processes, their supervisor, the demo."""
