"""The bundled demo: procedural-face reenactment with Anchored Diffusion vs. MultiDiffusion."""
