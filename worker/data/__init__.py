"""Training data: documents found and read, tokenized, split into train and validation, and batched."""
