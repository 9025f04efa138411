"""GPT-J and its pipeline stages: the model code, a stage's slice of it, the learning-rate schedule, export to Hugging Face."""
