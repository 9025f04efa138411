"""The operator's commands: `coordinator` (serve, check, plan), `coordinator token`."""
