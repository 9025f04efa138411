"""The worker as a program: its command line, its life in the swarm, its link to the coordinator, what it shows and exports."""
