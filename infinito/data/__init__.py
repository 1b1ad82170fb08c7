"""The data stages: ``download`` (raw text splits) and ``tokenize`` (GPT-2 BPE memmaps)."""
