"""Training and fine-tuning of Stable Diffusion pipelines."""
