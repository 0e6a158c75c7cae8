"""FedBPT engine: federated black-box prompt tuning, importable without NVFlare."""
