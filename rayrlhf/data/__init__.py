"""Data sources -> HF datasets of preference pairs and response groups -> tokenised, padded batches."""
