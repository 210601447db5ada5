"""Ray actors: the simulator pool and the Don't Die sync hosts."""
