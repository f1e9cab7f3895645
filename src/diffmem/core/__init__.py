"""Shared pieces: pipeline loading, the denoising loop, seeding, result types."""
