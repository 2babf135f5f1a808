"""Training: diffusion schedule math, losses, and one loop module per system."""
