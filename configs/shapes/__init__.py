"""Configs of the shapes-world demonstrations (vlm_jax/experiments/shapes/)."""
