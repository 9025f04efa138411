"""Pipeline planning as pure functions: stage splits, who serves which stage, the rate model, compression per worker."""
