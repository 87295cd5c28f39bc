"""The molecules world: RDKit molecules as SELFIES tokens, masked and autoregressive models, chemistry rewards."""
