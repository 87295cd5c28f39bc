"""The 3D shapes world: coloured spheres, cubes and cones on a ground disc, rendered by Gaussian splatting from orbiting cameras; its prompts, data and classical judge."""
