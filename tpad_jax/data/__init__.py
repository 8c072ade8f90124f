"""Raw formats, adapters, the synthetic catalogue, protocols, tokenizer and input pipelines."""
