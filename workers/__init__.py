"""Node-side processes: engine workers (and, with the control plane, node agents)."""
