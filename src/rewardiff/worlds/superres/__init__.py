"""The super-resolution world: shapes scenes, their low-resolution inputs, a judge of hallucination and a conditional model."""
