"""vdit-deploy: a video diffusion transformer from checkpoint to a fast, verified sampler."""
__version__ = "0.1.0"
