"""Vision encoder, language model, multimodal towers, MI estimators, session encoders, weight loaders."""
