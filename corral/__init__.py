"""The `corral` command that wires Corral's components together on one machine."""
