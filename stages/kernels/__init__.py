"""Triton kernels that more than one stage runs (the LLM core's decoder layers and the vision
encoder's tower): shared code, like the runtime and the contracts, not a stage of its own."""
