"""The swarm's decisions: who is in it, what each worker serves, whom to trust; `Swarm` orchestrates them."""
