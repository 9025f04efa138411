"""Reading text and turning it into tokens: shared by `coordinator data prepare` and the workers."""
