"""DeepSpeed engines that train the models, one process per rank (no Ray: the actors wrap these)."""
