"""Tensor parallelism: one LLM replica sharded over N processes, one device each.

`group` is a rank's place in its replica (the collectives), `ranks` starts and watches the
other ranks from rank 0, `plan` is the step plan rank 0 sends them every step, and
`follower` is their main loop. The sharded layers live in `models/parallel_layers.py`.
"""
