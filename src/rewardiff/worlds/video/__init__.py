"""The moving-shapes video world: clips of shapes moving together, its judge and its denoiser."""
