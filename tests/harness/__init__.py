"""Helpers the tests share: processes of the swarm, fault injection, a loopback P2P swarm, fleets."""
