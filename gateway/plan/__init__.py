"""Supervisory planning: grid cap, SoC band and headroom, and the perfect-foresight optimum."""
