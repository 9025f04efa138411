"""What a worker runs for its assignment: the swarm training runtime and its collaborators, and the standalone trainer."""
