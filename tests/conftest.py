"""Test-wide settings."""

import torch

# The suite's models are tiny: one thread is faster than two fighting over small matmuls,
# and it leaves the second core to whatever else the machine runs.
torch.set_num_threads(1)
