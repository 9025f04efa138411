"""The coordinator's durable state: the registry of workers and plans, checkpoints, join tokens (SQLite and files)."""
