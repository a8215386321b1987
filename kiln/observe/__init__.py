"""What leaves the trainer for dashboards: metrics.jsonl shipped to W&B (``wandb_shipper``)."""
