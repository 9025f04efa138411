"""What a run costs: the cost model (pure arithmetic), the live meter, and the report `coordinator plan` prints."""
