"""Training of an assembled TinyONN model (SMK and the baselines run by the same loop)."""
