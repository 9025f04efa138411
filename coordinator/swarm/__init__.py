"""The swarm's decisions as pure verdicts (admission, roster, trust, replanning, assignments, checkpoint
schedule, stats, summary); `commit` records plans, and `orchestrator.Swarm` applies the rest."""
