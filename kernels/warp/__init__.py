"""Flow warping with occlusion (WarpFace WarpCA): see README.md."""
