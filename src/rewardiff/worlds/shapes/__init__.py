"""The shapes world: images of counted, coloured shapes, their judge, base model and reward model."""
